"""Where a bfloat16 decoded token's time goes: torch profiler over 40 tokens of `sinks:4+1020` (cache ~300).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench-xeon/scripts/profile_decode.py [auto|int8|int4]
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import endless
from endless.transformer import Transformer

import os; torch.set_num_threads(int(os.environ.get("THREADS", "1")))
weights = sys.argv[1] if len(sys.argv) > 1 else "auto"
hf, tok = endless.load("smollm2-135m", dtype="bfloat16")
model = Transformer(hf, pack=True, weights=weights)
s = endless.Stream(model, "sinks:4+1020")
ids = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt").input_ids
s.feed(ids[:, :256], logprobs=False)
nxt = ids[:, 256:257]
for _ in range(10):
    s.feed(nxt, logprobs=False)
t = time.perf_counter()
for _ in range(20):
    s.feed(nxt, logprobs=False)
print("ms/token plain", (time.perf_counter() - t) / 20 * 1e3)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(40):
        s.feed(nxt, logprobs=False)
ka = prof.key_averages()
tot = sum(e.self_cpu_time_total for e in ka)
n = sum(e.count for e in ka if e.key.startswith("aten::"))
print(f"self total {tot/40/1e3:.2f} ms/token, aten op calls/token {n/40:.0f}")
print(ka.table(sort_by="self_cpu_time_total", row_limit=25))
