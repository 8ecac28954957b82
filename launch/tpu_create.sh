#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (single host or pod).
#   TPU_NAME=my-v5p ZONE=us-east5-a ACCELERATOR=v5p-16 launch/tpu_create.sh
# Optional: RUNTIME (software version), SPOT=1 (spot capacity), PROJECT, DRY_RUN=1.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE ACCELERATOR

case "${ACCELERATOR}" in
  v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME="${RUNTIME:-${default_runtime}}"
args=(gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}"
      --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}")
if [[ -n "${PROJECT:-}" ]]; then args+=(--project="${PROJECT}"); fi
if [[ "${SPOT:-0}" == "1" ]]; then args+=(--spot); fi

echo "Creating TPU VM ${TPU_NAME} (${ACCELERATOR}, runtime ${RUNTIME}) in ${ZONE}."
run "${args[@]}"
