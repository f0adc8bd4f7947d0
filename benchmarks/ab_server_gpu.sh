#!/bin/bash
# Side-by-side A/B of the whole consumer on the lent GPU box: this tree ("new") against an older commit
# unpacked in .cache/base, alternating new/base so both see the same machine and the same noise.
# Prepare here:  bash benchmarks/gpu_carry.sh && rm -rf .cache/base && mkdir -p .cache/base &&
#                git archive <REV> | tar -x -C .cache/base
# Carry .cache/wheels-gpu, .cache/gpu-assets and .cache/base; then: bash benchmarks/ab_server_gpu.sh [ROUNDS]
# [server.bench args]. Results: $OUT/ab-{new,base}-<round>.json and one line per run.
source "$(dirname "$0")/gpu_env.sh"
root=$PWD
rounds=${1:-2}
shift || true
args=(--embedder osnet_torch --gender off --batch-crops 2048 --crops 60000 --host-crops 0 --sizes ""
      --embed-process --embed-workers 2 --commit-process "$@")
for i in $(seq "$rounds"); do
  for rev in new base; do
    dir=$root; [ "$rev" = base ] && dir=$root/.cache/base
    (cd "$dir" && PYTHONPATH=/tmp/deps:$dir python3 -m server.bench "${args[@]}" --name "ab-$rev-$i" \
      --out "${OUT:-$root/results}" 2>&1 | grep -E "whole consumer" | sed "s/^ */$rev-$i /")
  done
done
