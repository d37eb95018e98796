#!/usr/bin/env bash
# One device call: install the wheels the GPU image lacks, then run what is asked.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
export FLASH_KDA_CACHE_DIR=/tmp/fkcache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$@"
