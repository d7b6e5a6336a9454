"""A/B of the compiled bfloat16 decode step's inductor options on this CPU (issue 21).

On an AVX2-only CPU oneDNN has no bfloat16 path, and a graph with frozen bfloat16 weights ran
SmolLM2's products through PyTorch's slow bfloat16 GEMM. This script builds SmolLM2-135M's
bfloat16 step in one process with each variant (dynamo reset between them), streams the same
tokens through ``sinks:4+252`` (a 100-token prompt, then 59 tokens one at a time) and prints the
median time of a decoded token:

- ``eager``: no compiled step (the packed eager path);
- ``frozen``: ``endless.step.INDUCTOR`` (weights frozen, oneDNN prepacking where it exists);
- ``unfrozen``: the same without freezing (weights stay graph inputs in their (out, in) layout);
- ``autotuned``: ``INDUCTOR`` plus ``AUTOTUNE`` (what ``endless.step.options`` picks where oneDNN
  has no bfloat16 path).

    python benchmarks/bench-zen3/scripts/step_bf16_ab.py THREADS [VARIANTS] [JSON]

VARIANTS is a comma-separated subset (default: all four). With JSON, the figures and the machine
(``endless.bench.timing.machine``) are written there too.
"""

import json
import statistics
import sys
import time

import torch

import endless
import endless.step as step
from endless.bench.timing import machine
from endless.cpu import onednn_bfloat16
from endless.stream import Stream
from endless.transformer import Transformer

threads = int(sys.argv[1])
variants = {"eager": None, "frozen": dict(step.INDUCTOR), "unfrozen": {**step.INDUCTOR, "freezing": False},
            "autotuned": {**step.INDUCTOR, **step.AUTOTUNE}}
chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(variants)
torch.set_num_threads(threads)
hf, _ = endless.load("smollm2-135m", dtype="bfloat16")
ids = torch.randint(0, hf.config.vocab_size, (1, 160), generator=torch.Generator().manual_seed(0))
result = {"threads": threads, "policy": "sinks:4+252", "onednn_bfloat16": onednn_bfloat16(),
          "ms_per_token": {}, "first_token_s": {}}
for name in chosen:
    torch._dynamo.reset()
    model = Transformer(hf, pack=True)
    if variants[name] is not None:
        step.options = lambda dtype, weights="auto", o=variants[name]: dict(o)  # the variant, whatever this CPU is
        model.compile_step()
    s = Stream(model, "sinks:4+252", chunk=64)
    t0 = time.perf_counter()
    s.feed(ids[:, :100])
    s.feed(ids[:, 100:101])
    first = time.perf_counter() - t0
    times = []
    with torch.inference_mode():
        for i in range(101, 160):
            t = time.perf_counter()
            s.feed(ids[:, i : i + 1])
            times.append(time.perf_counter() - t)
    result["ms_per_token"][name] = 1e3 * statistics.median(times[5:])
    result["first_token_s"][name] = first
    print(f"{name:10s} {result['ms_per_token'][name]:7.2f} ms a token, {threads} thread(s) "
          f"(prompt + first token, with compilation: {first:.0f} s)", flush=True)
if len(sys.argv) > 3:
    result["machine"] = machine()
    with open(sys.argv[3], "w") as f:
        json.dump(result, f, indent=1)
