#!/usr/bin/env bash
# The acceptance run on the GPU machine, in three stages that each fit one device call; logs under $OUT.
# From the repo root, carrying .whl (tools: ../shared/tools/device-wheels.sh, plus the FLA autotune tgz
# as .whl/fla-autotune.tgz) and .dev/base (the previous commit's flash_kda package, to time it in the
# same call: git archive <sha> flash_kda | tar -x -C .dev/base):
#   FLASH_KDA_COMMIT=<sha> bash tools/device_validate.sh tests   # precompile, GPU suite and sanitizer through both
#                                                                # chunked variants, accuracy, the image flow
#   FLASH_KDA_COMMIT=<sha> bash tools/device_validate.sh bench   # benchmarks (FLA in the same run), host cost
#   bash tools/device_validate.sh base                           # the previous commit's rows and host cost
#     (add --sweep to the bench_decode line to time every CTAs-per-head choice)
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests:$PWD/benchmarks
export FLASH_KDA_CACHE_DIR=/tmp/fkcache
mkdir -p /tmp/tc && tar -xzf .whl/fla-autotune.tgz -C /tmp/tc && export TRITON_CACHE_DIR=/tmp/tc
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/card.txt
timeout 240 python -m flash_kda precompile --jobs 16 > $OUT/precompile.log 2>&1; tail -1 $OUT/precompile.log

case "${1:-tests}" in
tests)
  timeout 60 python examples/quickstart.py 2>&1 | tail -2
  for variant in clustered portable; do  # FLASH_KDA_KERNEL: the whole suite and the sanitizer through both
    FLASH_KDA_KERNEL=$variant timeout 300 python -m pytest -q -rA -m gpu tests -p no:cacheprovider > $OUT/gpu_tests_$variant.log 2>&1
    grep -E "variant in use|FAILED|^[0-9]+ passed|failed" $OUT/gpu_tests_$variant.log | tail -8
    FLASH_KDA_KERNEL=$variant timeout 240 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 \
      python tools/sanitize_case.py > $OUT/sanitizer_$variant.log 2>&1; echo "compute-sanitizer $variant rc=$?"
    tail -1 $OUT/sanitizer_$variant.log
  done
  timeout 240 python benchmarks/accuracy.py > $OUT/accuracy.md 2>&1; tail -1 $OUT/accuracy.md
  # the image flow: root baked the cache above; verify it, then another uid runs KDA from it, compiles forbidden
  timeout 60 python -m flash_kda verify --cache-dir /tmp/fkcache | tail -1
  timeout 90 setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp FLASH_KDA_DISABLE_JIT=1 \
    python -c 'import os; print("uid", os.getuid())' examples/quickstart.py 2>&1 | tail -1
  timeout 90 setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp FLASH_KDA_DISABLE_JIT=1 \
    python examples/quickstart.py 2>&1 | tail -2
  ;;
bench)
  timeout 200 python benchmarks/bench_decode.py 2>&1 | tee $OUT/bench_decode.md | tail -24
  timeout 420 python benchmarks/bench_fwd.py 2>&1 | tee $OUT/bench_fwd.md | tail -60
  timeout 60 python benchmarks/host_cost.py > $OUT/host_cost.md 2>&1; grep "whole fwd" $OUT/host_cost.md
  ;;
base)  # the previous commit (.dev/base) in the same call as a re-run of ours: prefill rows, decode table, host cost
  BASE="env PYTHONPATH=/tmp/site:$PWD/.dev/base:$PWD/tests:$PWD/benchmarks FLASH_KDA_CACHE_DIR=/tmp/fkcache-base"
  # python -m puts the working directory first on sys.path: run the base precompile from inside .dev/base
  (cd .dev/base && $BASE timeout 120 python -m flash_kda precompile --jobs 16) > $OUT/precompile_base.log 2>&1
  tail -1 $OUT/precompile_base.log
  FLASH_KDA_COMMIT=base $BASE timeout 150 python benchmarks/bench_fwd.py --quick --no-fla 2>&1 | tee $OUT/bench_fwd_base.md | tail -11
  timeout 150 python benchmarks/bench_fwd.py --quick --no-fla 2>&1 | tee $OUT/bench_fwd_rerun.md | tail -11
  FLASH_KDA_COMMIT=base $BASE timeout 100 python benchmarks/bench_decode.py --no-fla --no-softplus > $OUT/bench_decode_base.md 2>&1
  grep -E "^\| (decode|verify)" $OUT/bench_decode_base.md
  $BASE timeout 60 python benchmarks/host_cost.py > $OUT/host_cost_base.md 2>&1; grep "whole fwd" $OUT/host_cost_base.md
  timeout 60 python benchmarks/host_cost.py > $OUT/host_cost_rerun.md 2>&1; grep "whole fwd" $OUT/host_cost_rerun.md
  ;;
esac
