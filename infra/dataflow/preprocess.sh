#!/usr/bin/env bash
# pulsepipe preprocess on Google Cloud Dataflow, with the CPU image as the workers' custom container.
#   PROJECT=my-project REGION=europe-west4 BUCKET=gs://my-bucket IMAGE=REGION-docker.pkg.dev/.../pulsepipe:cpu \
#     infra/dataflow/preprocess.sh ubfc-rppg gs://my-bucket/raw/ubfc gs://my-bucket/pre/ubfc
# Every option after --output is a Beam pipeline option, passed through unchanged.
set -euo pipefail
layout=${1:?layout}; input=${2:?input URI}; output=${3:?output URI}
exec pulsepipe preprocess --engine beam --layout "$layout" --input "$input" --output "$output" \
  --runner=DataflowRunner --project="${PROJECT:?}" --region="${REGION:?}" \
  --temp_location="${BUCKET:?}/dataflow/tmp" --staging_location="${BUCKET}/dataflow/staging" \
  --sdk_container_image="${IMAGE:?}" --sdk_location=container \
  --experiments=use_runner_v2 --max_num_workers="${MAX_WORKERS:-32}" --machine_type="${MACHINE_TYPE:-n2-standard-8}"
