#!/usr/bin/env bash
# Deletes a TPU VM slice (stops the billing).
#   TPU_NAME=my-v5p ZONE=us-east5-a launch/tpu_delete.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
require TPU_NAME ZONE

project=()
if [[ -n "${PROJECT:-}" ]]; then project=(--project="${PROJECT}"); fi
echo "Deleting TPU VM ${TPU_NAME} in ${ZONE}."
run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet "${project[@]}"
