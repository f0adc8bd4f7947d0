#!/bin/bash
# Side-by-side A/B of the whole consumer on the lent GPU box: this tree ("new") against an older commit
# unpacked in .cache/base, alternating runs so every variant sees the same machine and the same noise.
# Prepare here:  bash benchmarks/gpu_carry.sh && rm -rf .cache/base && mkdir -p .cache/base &&
#                git archive <REV> | tar -x -C .cache/base
# Carry .cache/wheels-gpu, .cache/gpu-assets and .cache/base; then:
#   bash benchmarks/ab_server_gpu.sh [ROUNDS] [VARIANT ...]
# A variant is NAME:TREE[:server.bench args], TREE "new" (this tree) or "base" (.cache/base); the default is
# "new:new base:base". Results: ab-<NAME>-<round>.json in $OUT/ab.tar.gz and one line per run. The common args are the
# crop-heavy settings, so the base tree must be recent enough to know --prepare-ahead (session 12 on).
source "$(dirname "$0")/gpu_env.sh"
root=$PWD
rounds=${1:-2}
shift || true
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(new:new base:base)
args=(--embedder osnet_torch --gender off --batch-crops 2048 --crops 60000 --host-crops 0 --sizes ""
      --embed-process --embed-workers 3 --prepare-ahead 2 --commit-process)
# Every run's JSON (and with AB_SAMPLE=1 its CPU samples, benchmarks/cpu_sampler.py) goes into one archive,
# $OUT/ab.tar.gz, rewritten after each run: the device hands back at most 8 files a call, and a call cut off at
# its time limit still returns the runs that finished.
work=$(mktemp -d)
for i in $(seq "$rounds"); do
  for v in "${variants[@]}"; do
    IFS=: read -r name tree extra <<< "$v"
    dir=$root; [ "$tree" = base ] && dir=$root/.cache/base
    wrap=(); [ "${AB_SAMPLE:-0}" = 1 ] && wrap=(python3 "$root/benchmarks/cpu_sampler.py" --out "$work/cpu-$name-$i.json" --)
    t0=$SECONDS
    # shellcheck disable=SC2086  # the variant's extra args are meant to split
    (cd "$dir" && PYTHONPATH=/tmp/deps:$dir "${wrap[@]}" python3 -m server.bench "${args[@]}" $extra \
      --name "ab-$name-$i" --out "$work" 2>&1 | grep -E "whole consumer|Traceback|Error|box busy" \
      | sed "s/^ */$name-$i /")
    echo "$name-$i took $((SECONDS - t0)) s"
    rm -f "$work"/ab-*.png
    if [ -n "${OUT:-}" ]; then tar -czf "$OUT/ab.tar.gz" -C "$work" .; else cp "$work"/*.json "$root/results/"; fi
  done
done
