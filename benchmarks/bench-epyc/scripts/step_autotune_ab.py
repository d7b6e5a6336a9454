"""A/B of the compiled decode step's float32 products: inductor's default against autotuned.

``endless.step`` compiles float32 graphs with ``AUTOTUNE`` (inductor times its C++ GEMM template
against the library call for each product and keeps the faster). This script builds SmolLM2-135M's
float32 step both ways in one process (dynamo reset between them), streams the same 400 tokens
through ``sinks:4+252`` (a 300-token chunk, then one token at a time) and prints the median time
of a decoded token and the largest logit difference between the two.

    python benchmarks/bench-epyc/scripts/step_autotune_ab.py THREADS [JSON]

With JSON, the figures and the machine (``endless.bench.timing.machine``: CPU model, ISA, torch)
are written there too.
"""

import json
import statistics
import sys
import time

import torch

import endless
import endless.step as step
from endless.bench.timing import machine
from endless.stream import Stream
from endless.transformer import Transformer

threads = int(sys.argv[1])
torch.set_num_threads(threads)
hf, _ = endless.load("smollm2-135m", dtype="float32")
ids = torch.randint(0, hf.config.vocab_size, (1, 400), generator=torch.Generator().manual_seed(0))
autotune = dict(step.AUTOTUNE)
last = {}
result = {"threads": threads, "policy": "sinks:4+252", "ms_per_token": {}, "first_token_s": {}}
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
    result["ms_per_token"][name] = 1e3 * statistics.median(times[5:])
    result["first_token_s"][name] = first
    print(f"{name:10s} {1e3 * statistics.median(times[5:]):6.2f} ms a token, {threads} thread(s) "
          f"(prompt + first token, with compilation: {first:.0f} s)", flush=True)
result["max_abs_dlogit"] = (last["default"] - last["autotuned"]).abs().max().item()
print(f"max |dlogit| default vs autotuned: {result['max_abs_dlogit']:.1e}")
if len(sys.argv) > 2:
    result["machine"] = machine()
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)
