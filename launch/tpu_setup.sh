#!/usr/bin/env bash
# Copies this repository to every worker of a TPU VM slice and installs it with the tpu extra.
#   TPU_NAME=my-v5p ZONE=us-east5-a launch/tpu_setup.sh
# Optional: PROJECT, REMOTE_DIR (default dense_ssm, relative to the remote home directory),
# DRY_RUN=1.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE

REPO="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-dense_ssm}"
remote_dir="$(printf '%q' "${REMOTE_DIR}")"  # one word in the remote shell, whatever it holds
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project="${PROJECT}"); fi

ARCHIVE="$(mktemp -t dense_ssm.XXXXXX.tar.gz)"
trap 'rm -f "${ARCHIVE}"' EXIT
echo "Packing ${REPO} (git-tracked files) and installing it on all workers of ${TPU_NAME}."
run git -C "${REPO}" archive --format=tar.gz -o "${ARCHIVE}" HEAD
run gcloud compute tpus tpu-vm scp "${ARCHIVE}" "${TPU_NAME}:dense_ssm.tar.gz" \
    --zone="${ZONE}" --worker=all "${project[@]}"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all "${project[@]}" \
    --command="mkdir -p ${remote_dir} && tar -xzf dense_ssm.tar.gz -C ${remote_dir} && cd ${remote_dir} && python3 -m pip install -q -e '.[tpu]'"
