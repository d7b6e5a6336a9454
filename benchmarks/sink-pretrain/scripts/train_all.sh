#!/usr/bin/env bash
# Train the three variants of issue 23 one after the other, same budget (one thread each).
# Usage, from the repository root: benchmarks/sink-pretrain/scripts/train_all.sh [VARIANT...]
set -euo pipefail
B=benchmarks/sink-pretrain
mkdir -p "$B/models" "$B/results" "$B/logs"
for v in "${@:-vanilla zero-sink learnable-sink}"; do
  for variant in $v; do
    OMP_NUM_THREADS=1 ${ENDLESS:-endless} train sink-pretrain --variant "$variant" --steps 1200 --batch 16 --threads 1 \
      --save "$B/models/$variant" --json "$B/results/train-$variant.json" > "$B/logs/train-$variant.log" 2>&1
  done
done
