#!/usr/bin/env bash
# Runs the same training command on every worker of a TPU VM slice (one process per host;
# jax.distributed.initialize finds the other hosts by itself).
#   TPU_NAME=my-v5p ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/retnet_1b3 \
#     launch/tpu_run.sh --config=configs/retnet_1b3.py --config.data.tokenizer=gs://.../tok.model
# WORKDIR must be shared by all hosts (a gs:// bucket or a shared mount). Extra arguments go
# to dense_ssm.train. Optional: PROJECT, REMOTE_DIR (default dense_ssm, relative to the remote
# home directory), DRY_RUN=1.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE WORKDIR

REMOTE_DIR="${REMOTE_DIR:-dense_ssm}"
project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project="${PROJECT}"); fi
train_args=""
for a in "$@"; do train_args+=" $(printf '%q' "${a}")"; done
# Every value that reaches the remote shell is quoted (printf %q): it is one word there.
remote="cd $(printf '%q' "${REMOTE_DIR}") && python3 -m dense_ssm.train --distributed=on --workdir=$(printf '%q' "${WORKDIR}")${train_args} 2>&1 | tee -a train.log"

echo "Training on all workers of ${TPU_NAME}; workdir ${WORKDIR}; each worker logs to ~/${REMOTE_DIR}/train.log."
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all "${project[@]}" \
    --command="${remote}"
