"""A decoded token through the compiled step (endless.step) against the eager path, same process.

20 interleaved tokens of `sinks:4+1020` at a cache of ~260, after a 256-token prompt.
Usage: THREADS=2 OMP_NUM_THREADS=2 python benchmarks/bench-xeon/scripts/step_vs_eager.py [float32|bfloat16] [auto|int8|int4]
"""
import os
import sys
import time

import torch

import endless
from endless.transformer import Transformer

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
weights = sys.argv[2] if len(sys.argv) > 2 else "auto"
hf, tok = endless.load("smollm2-135m", dtype=dtype)
ids = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt").input_ids
eager = endless.Stream(Transformer(hf, pack=True, weights=weights), "sinks:4+1020")
compiled = endless.Stream(Transformer(hf, pack=True, weights=weights).compile_step(), "sinks:4+1020")
for s in (eager, compiled):
    s.feed(ids[:, :256], logprobs=False)
nxt = ids[:, 256:257]
t = time.perf_counter()
compiled.feed(nxt, logprobs=False)
print(f"first compiled token (compiles): {time.perf_counter() - t:.1f} s")
times = {"eager": [], "compiled": []}
for r in range(23):
    for name, s in (("eager", eager), ("compiled", compiled)):
        t = time.perf_counter()
        s.feed(nxt, logprobs=False)
        if r >= 3:
            times[name].append(time.perf_counter() - t)
med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
print(f"{dtype}, weights {weights}, {torch.get_num_threads()} thread(s): eager {med['eager']:.2f} ms, compiled {med['compiled']:.2f} ms, "
      f"{med['eager'] / med['compiled']:.2f}x")
