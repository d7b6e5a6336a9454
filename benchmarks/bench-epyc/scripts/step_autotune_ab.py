"""A/B of the compiled decode step's float32 products: inductor's default against autotuned.

``endless.step`` compiles float32 graphs with ``AUTOTUNE`` (inductor times its C++ GEMM template
against the library call for each product and keeps the faster). This script builds SmolLM2-135M's
float32 step both ways in one process (dynamo reset between them), streams the same 400 tokens
through ``sinks:4+252`` (a 300-token chunk, then one token at a time) and prints the median time
of a decoded token and the largest logit difference between the two.

    python benchmarks/bench-epyc/scripts/step_autotune_ab.py THREADS
"""

import statistics
import sys
import time

import torch

import endless
import endless.step as step
from endless.stream import Stream
from endless.transformer import Transformer

threads = int(sys.argv[1])
torch.set_num_threads(threads)
hf, _ = endless.load("smollm2-135m", dtype="float32")
ids = torch.randint(0, hf.config.vocab_size, (1, 400), generator=torch.Generator().manual_seed(0))
autotune = dict(step.AUTOTUNE)
last = {}
for name, options in {"default": {}, "autotuned": autotune}.items():
    step.AUTOTUNE = options
    torch._dynamo.reset()  # else the first variant's graph is reused
    model = Transformer(hf, pack=True, kernel="transposed").compile_step()
    s = Stream(model, "sinks:4+252", chunk=64)
    t0 = time.perf_counter()
    s.feed(ids[:, :300])
    s.feed(ids[:, 300:301])
    first = time.perf_counter() - t0
    times = []
    with torch.inference_mode():
        for i in range(301, 400):
            t = time.perf_counter()
            out = s.feed(ids[:, i : i + 1])
            times.append(time.perf_counter() - t)
    last[name] = out[0, -1].clone()
    print(f"{name:10s} {1e3 * statistics.median(times[5:]):6.2f} ms a token, {threads} thread(s) "
          f"(prompt + first token, with compilation: {first:.0f} s)", flush=True)
print(f"max |dlogit| default vs autotuned: {(last['default'] - last['autotuned']).abs().max().item():.1e}")
