#!/usr/bin/env bash
# Point DVC's `s3` remote at a bucket (AWS or any S3-compatible store) and make it the default.
#   scripts/dvc-remote-s3.sh                      # from GALIP_DVC_BUCKET / GALIP_DVC_PREFIX / AWS_ENDPOINT_URL
#   scripts/dvc-remote-s3.sh my-bucket galip/dvc http://127.0.0.1:9000
# Written to .dvc/config.local (not committed): credentials stay in the AWS env/profile chain.
set -euo pipefail
bucket=${1:-${GALIP_DVC_BUCKET:?set GALIP_DVC_BUCKET or pass the bucket name}}
prefix=${2:-${GALIP_DVC_PREFIX:-galip/dvc}}
endpoint=${3:-${AWS_ENDPOINT_URL:-}}
dvc=${DVC:-dvc}
"$dvc" remote add --local -f -d s3 "s3://${bucket}/${prefix}"
if [ -n "$endpoint" ]; then
  "$dvc" remote modify --local s3 endpointurl "$endpoint"
fi
echo "dvc remote 's3' -> s3://${bucket}/${prefix}${endpoint:+ (endpoint $endpoint)}"
