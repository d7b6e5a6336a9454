#!/usr/bin/env bash
# Evaluate the three trained variants of issue 23 (after train_all.sh), one thread.
# Streaming perplexity on the held-out 5 % of each corpus, 4096 bytes, cache 128 = S sinks + (128-S)
# recent tokens for S = 0, 1, 2, 4, 8 (and four newlines as sinks); the learnable-sink model with its
# sink token 259 before the text (so sinks:1+127 keeps exactly that token), and once without it.
# Then where the attention goes (analyze attention) on 256 held-out bytes.
# Usage, from the repository root: [VARIANTS="vanilla zero-sink"] benchmarks/sink-pretrain/scripts/eval_all.sh
set -euo pipefail
B=benchmarks/sink-pretrain
E="${ENDLESS:-endless}"  # e.g. ENDLESS="python -m endless.cli.main" with PYTHONPATH=src
run() { OMP_NUM_THREADS=1 $E "$@"; }
for v in ${VARIANTS:-vanilla zero-sink learnable-sink}; do
  M="$B/models/$v"
  prefix=(); [ "$v" = learnable-sink ] && prefix=(--prefix-token 259)
  for text in kjv-heldout shakespeare-heldout; do
    run eval sinks --model "$M" --dtype float32 --threads 1 --cache 128 --no-recompute --text "$text" --tokens 4096 \
      "${prefix[@]}" --json "$B/results/sinks-$v-$text.json" --plot "$B/results/sinks-$v-$text.png" --smooth 128
    if [ "$v" = learnable-sink ]; then
      run eval sinks --model "$M" --dtype float32 --threads 1 --cache 128 --no-recompute --text "$text" --tokens 4096 \
        --json "$B/results/sinks-$v-noprefix-$text.json"
    fi
  done
  run analyze attention --model "$M" --threads 1 --text kjv-heldout --tokens 256 "${prefix[@]}" \
    --json "$B/results/attention-$v.json" --bars "$B/results/attention-$v.png"
done
"${PYTHON:-python}" "$B/scripts/summarize.py" > "$B/results/summary.md"
