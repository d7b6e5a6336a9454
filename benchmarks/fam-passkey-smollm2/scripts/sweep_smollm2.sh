#!/usr/bin/env bash
# The SmolLM2 sweep of the FAM notebook, 7.3 (docs/experiments/fam-notebook.md): one short
# `endless train fam` run per setting (same data seed, same number of steps), each measured by
# benchmarks/fam-passkey-smollm2/scripts/digits.py (answer loss and digits right, keys at depths
# 0.1-0.7, outside the window) at 384 and 1,024 tokens. Two runs at a time, one thread each.
#
#   bash benchmarks/fam-passkey-smollm2/scripts/sweep_smollm2.sh OUT STEPS NAME1 NAME2 ...     (names: the table below)
set -euo pipefail
out=$1 steps=$2; shift 2
repo=$(cd "$(dirname "$0")/../../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
base=(--policy "fam:64x1+16,firstres" --min-len 192 --max-len 384 --lr 1e-3 --prompt-lr 3e-3)
flags() {  # the settings: each is the base run with one thing changed
  case $1 in
    base) ;;
    seed1) echo --seed 1 ;;
    bswa) echo --policy bswa:64x1 ;;
    lr3e-3) echo --lr 3e-3 --prompt-lr 1e-2 ;;
    lr3e-4) echo --lr 3e-4 --prompt-lr 1e-3 ;;
    F4) echo --policy fam:64x1+4,firstres ;;
    F64) echo --policy fam:64x1+64,firstres ;;
    B32) echo --policy fam:32x2+16,firstres ;;
    B128M0) echo --policy fam:128x0+16,firstres ;;
    M0) echo --policy fam:64x0+16,firstres ;;
    zerores) echo --policy fam:64x1+16 ;;
    rsp) echo --rsp 0.8 ;;
    init) echo --prompt-init "' The pass key is'" ;;
    depth) echo --max-depth 0.6 ;;
    rank64) echo --lora-rank 64 --lora-alpha 128 ;;
    text) echo --text-fraction 0.2 ;;
    *) echo "unknown setting $1" >&2; exit 2 ;;
  esac
}
run() {
  local name=$1 dir=$out/$1
  mkdir -p "$dir"
  eval "extra=($(flags "$name"))"
  "$py" -m endless.cli.main train fam --threads 1 "${base[@]}" "${extra[@]}" --steps "$steps" \
      --out "$dir/ckpt" --eval-lengths 384 --eval-examples 4 --json "$dir/train.json" >"$dir/train.log" 2>&1
  for n in 384 1024; do "$py" "$repo/benchmarks/fam-passkey-smollm2/scripts/digits.py" "$dir/ckpt" $n >"$dir/digits_$n.txt" 2>>"$dir/train.log"; done
  echo "$name done $(date +%T)"
}
for name in "$@"; do
  flags "$name" >/dev/null
  (( $(jobs -rp | wc -l) < 2 )) || wait -n
  run "$name" &
done
wait
