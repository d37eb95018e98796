#!/usr/bin/env bash
# Bake the kernel cache into a deployment image at build time (no GPU needed), verify it, then run
# with run-time compiles forbidden. In a Dockerfile:
#   RUN FLASH_KDA_CACHE_DIR=/opt/flash_kda_cache python -m flash_kda precompile --arch sm_90a \
#    && FLASH_KDA_CACHE_DIR=/opt/flash_kda_cache python -m flash_kda verify --arch sm_90a
#   ENV FLASH_KDA_CACHE_DIR=/opt/flash_kda_cache FLASH_KDA_DISABLE_JIT=1
set -euo pipefail
CACHE=${1:-/tmp/flash_kda_image_cache}
FLASH_KDA_CACHE_DIR=$CACHE python -m flash_kda precompile --arch sm_90a
FLASH_KDA_CACHE_DIR=$CACHE python -m flash_kda verify --arch sm_90a   # exit 1 and one line per problem
FLASH_KDA_CACHE_DIR=$CACHE python -m flash_kda info
echo "serve with: FLASH_KDA_CACHE_DIR=$CACHE FLASH_KDA_DISABLE_JIT=1 <your server>"
