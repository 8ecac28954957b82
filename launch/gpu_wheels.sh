#!/usr/bin/env bash
# Downloads the wheels that a CUDA jax image lacks to run `python -m dense_ssm.train`, for an image
# that already has jax, flax, optax, orbax-checkpoint, tensorboard, sentencepiece, safetensors,
# absl-py and numpy with their dependencies (etils, protobuf, cloudpickle, msgpack, PyYAML, ...).
# Target: CPython 3.12 on x86_64 Linux with glibc >= 2.28 (set PYTHON_VERSION for another CPython).
#
#   launch/gpu_wheels.sh [DIR]          # on a machine with internet; DIR defaults to <repo>/.whl
#   python -m pip install --no-deps DIR/*.whl     # then on the GPU machine, offline
#
# grain and array_record are compiled (cp312) wheels; ml_collections and portpicker (imported by
# grain) are pure Python. TensorFlow and clu are not needed.
set -euo pipefail

DIR="${1:-$(cd "$(dirname "$0")/.." && pwd)/.whl}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
WHEELS=(
  grain==0.2.18
  array_record==0.8.6
  ml_collections==1.1.0
  portpicker==1.6.0
)

mkdir -p "${DIR}"
python3 -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION}" \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "${DIR}" "${WHEELS[@]}"
echo "Wheels in ${DIR}; on the GPU machine: python -m pip install --no-deps ${DIR}/*.whl"
