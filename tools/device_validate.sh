#!/usr/bin/env bash
# The acceptance run on the GPU machine; logs under $OUT. Call from the repo root:
#   FLASH_KDA_COMMIT=<sha> bash tools/device_validate.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests:$PWD/benchmarks
export FLASH_KDA_CACHE_DIR=/tmp/fkcache
mkdir -p /tmp/tc && tar -xzf .whl/fla-autotune.tgz -C /tmp/tc && export TRITON_CACHE_DIR=/tmp/tc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/card.txt
timeout 120 python -m flash_kda precompile --arch sm_90a --jobs 16 > $OUT/precompile.log 2>&1; tail -1 $OUT/precompile.log
timeout 60 python examples/quickstart.py 2>&1 | tee $OUT/quickstart.log
timeout 240 python -m pytest -q -m gpu tests 2>&1 | tee $OUT/gpu_tests.log | grep -E "passed|failed|Error" | tail -5
timeout 120 python benchmarks/accuracy.py > $OUT/accuracy.md 2>&1; tail -1 $OUT/accuracy.md
timeout 120 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 python tools/sanitize_case.py > $OUT/sanitizer.log 2>&1; echo "compute-sanitizer rc=$?"; tail -1 $OUT/sanitizer.log
timeout 240 python benchmarks/bench_fwd.py 2>&1 | tee $OUT/bench.md | tail -30
timeout 60 python benchmarks/host_cost.py > $OUT/host_cost.md 2>&1; tail -12 $OUT/host_cost.md
( for e in streaming_state varlen_batching fla_backend; do timeout 60 python examples/$e.py 2>&1 | grep -v "^INFO:fla\|Deprecat\|warn" | tail -2; done ) > $OUT/examples.log 2>&1; cat $OUT/examples.log
