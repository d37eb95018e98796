#!/usr/bin/env bash
# The issue-2 acceptance run on the GPU machine; logs under $OUT. Call from the repo root:
#   FLASH_KDA_COMMIT=<sha> bash tools/device_validate.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests:$PWD/benchmarks
export FLASH_KDA_CACHE_DIR=/tmp/fkcache
mkdir -p /tmp/tc && tar -xzf .whl/fla-autotune.tgz -C /tmp/tc && export TRITON_CACHE_DIR=/tmp/tc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/card.txt
python -m flash_kda precompile --arch sm_90a --jobs 16 > $OUT/precompile.log 2>&1; tail -1 $OUT/precompile.log
python examples/quickstart.py 2>&1 | tee $OUT/quickstart.log; python -m pytest -q -m gpu tests 2>&1 | tee $OUT/gpu_tests.log | tail -5
python benchmarks/accuracy.py 2>&1 | tee $OUT/accuracy.md | tail -25
compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 python tools/sanitize_case.py > $OUT/sanitizer.log 2>&1; echo "compute-sanitizer rc=$?"; tail -3 $OUT/sanitizer.log
python benchmarks/bench_fwd.py 2>&1 | tee $OUT/bench.md | tail -32
