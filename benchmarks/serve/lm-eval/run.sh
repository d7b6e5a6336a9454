#!/usr/bin/env bash
# lm-evaluation-harness against `endless serve` (issue 22): ARC-Easy through local-completions,
# then the same questions through `endless eval arc --isolated` on the same weights, so the two
# scorers can be compared question by question. lm-eval lives in its own environment
# (LMEVAL, default /tmp/lmeval: python -m venv; pip install torch==2.13.0 "lm-eval==0.4.*").
set -euo pipefail
cd "$(dirname "$0")/../../.."
LMEVAL=${LMEVAL:-/tmp/lmeval}
N=${N:-100}
PORT=${PORT:-8765}
OUT=benchmarks/serve/lm-eval/results
TASK=$(mktemp -d)
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONPATH=src
# the first N questions as the task's local JSON-lines file
.venv/bin/python - "$N" "$TASK/arc_easy.jsonl" <<'PY'
import json, sys
from endless.data.arc import load_questions
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    for q in load_questions()[:n]:
        f.write(json.dumps({"id": q.id, "question": q.question, "choices": list(q.choices), "gold": q.gold}) + "\n")
PY
sed "s#arc_easy.jsonl#$TASK/arc_easy.jsonl#" benchmarks/serve/lm-eval/task/endless_arc_easy.yaml > "$TASK/endless_arc_easy.yaml"
.venv/bin/python -m endless.cli.main serve --threads 1 --dtype bfloat16 --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
TOK=$(.venv/bin/python -c "from endless.models.load import resolve; print(resolve('smollm2-135m'))")
start=$(date +%s)
"$LMEVAL/bin/lm_eval" --model local-completions \
  --model_args "model=smollm2-135m,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$TOK,tokenizer_backend=huggingface,num_concurrent=1,max_retries=1" \
  --tasks endless_arc_easy --include_path "$TASK" --output_path "$OUT/lm_eval" --log_samples 2>&1 \
  | tr "\r" "\n" | grep -v "Requesting API\|Tokenizing inputs\|examples/s\|it/s" | tail -12 | tee "$OUT/lm_eval.txt"
echo "lm-eval seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/lm_eval.txt"
kill $SERVER; wait $SERVER 2>/dev/null || true
.venv/bin/python -m endless.cli.main eval arc --threads 1 --dtype bfloat16 --policy dense --questions "$N" \
  --json "$OUT/endless_arc_isolated.json" 2>&1 | tail -8 | tee "$OUT/endless_arc.txt"
# question by question: lm-eval's argmax of summed log-probs against ours, and its log-probs
# normalised by characters + 1 against our per-character prediction
.venv/bin/python - "$OUT" <<'PY'
import glob, json, sys
out = sys.argv[1]
lm = sorted((json.loads(l) for l in open(sorted(glob.glob(f"{out}/lm_eval/*/samples_*.jsonl"))[-1])), key=lambda d: d["doc_id"])
ours = json.load(open(f"{out}/endless_arc_isolated.json"))["outcomes"]["one-at-a-time"]
def argmax(d, norm):
    lps = [float(r[0]) for r in d["filtered_resps"]]
    return max(range(len(lps)), key=lambda i: lps[i] / norm(d["doc"]["choices"][i]))
same_sum = sum(argmax(a, lambda c: 1) == b["predicted_sum"] for a, b in zip(lm, ours, strict=True))
same_char = sum(argmax(a, lambda c: len(c) + 1) == b["predicted"] for a, b in zip(lm, ours, strict=True))
result = {"questions": len(ours), "lm_eval_acc": sum(a["acc"] for a in lm) / len(lm),
          "lm_eval_acc_norm": sum(a["acc_norm"] for a in lm) / len(lm),
          "endless_acc_sum": sum(b["predicted_sum"] == b["gold"] for b in ours) / len(ours),
          "endless_acc_per_char": sum(b["predicted"] == b["gold"] for b in ours) / len(ours),
          "same_prediction_sum": same_sum, "same_prediction_per_char": same_char}
json.dump(result, open(f"{out}/compare.json", "w"), indent=1)
print(json.dumps(result, indent=1))
PY
