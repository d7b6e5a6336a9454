"""One decoded token's weight products of SmolLM2-135M, per kernel, in GB/s of weights (issue 21).

Random weights of SmolLM2-135M's shapes (30 layers of fused q/k/v, o, fused gate/up and down, then
the LM head: 121 one-row products, 269 MB in bfloat16, more than the L3 holds, so they stream from
memory), each kernel timed over all of them in interleaved rounds (median of 15):

- ``onednn``: oneDNN's prepacked weight (``torch.ops.mkldnn``; missing where oneDNN has no path);
- ``linear``: ``F.linear`` on the (out, in) weight; ``transposed``: ``mm`` on an (in, out) copy;
- ``sumwx``: a compiled ``sum(w * x)`` in float32 (inductor's own loop, the weight an input);
- ``int8 pack``: ``_weight_int8pack_mm`` on per-channel int8 weights; ``int8 sumwx``: compiled, widened.

    python benchmarks/bench-zen3/scripts/products.py THREADS [JSON]
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from endless.bench.timing import machine

threads = int(sys.argv[1])
torch.set_num_threads(threads)
torch._dynamo.config.recompile_limit = 256  # one compiled sum(w * x) per shape and dtype
torch._dynamo.config.accumulated_recompile_limit = 4096
D, MLP, KV, L, V = 576, 1536, 192, 30, 49152  # SmolLM2-135M: width, MLP width, k/v width, layers, vocabulary
shapes = [s for _ in range(L) for s in ((D + 2 * KV, D), (D, D), (2 * MLP, D), (D, MLP))] + [(V, D)]
g = torch.Generator().manual_seed(0)
W32 = [torch.randn(o, i, generator=g) * 0.02 for o, i in shapes]
X32 = [torch.randn(1, i, generator=g) for o, i in shapes]


def onednn(ws):
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
    return [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]


def linear(ws):
    return [lambda x, w=w: F.linear(x, w) for w in ws]


def transposed(ws):
    return [lambda x, wt=wt: torch.mm(x, wt) for wt in (w.t().contiguous() for w in ws)]


_sum = torch.compile(lambda w, x: (w.float() * x.float()).sum(-1, keepdim=True).t().to(x.dtype), dynamic=False)


def sumwx(ws):
    return [lambda x, w=w: _sum(w, x) for w in ws]


def _int8(w):
    s = w.float().abs().amax(1).clamp_min(1e-8) / 127
    return torch.round(w.float() / s[:, None]).to(torch.int8), s


def int8pack(ws):
    pairs = [(q, s.to(torch.bfloat16)) for q, s in map(_int8, ws)]
    return [lambda x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in pairs]


_sum8 = torch.compile(lambda q, s, x: ((q.float() * x.float()).sum(-1) * s).unsqueeze(0).to(x.dtype), dynamic=False)


def int8sumwx(ws):
    return [lambda x, q=q, s=s: _sum8(q, s, x) for q, s in map(_int8, ws)]


CANDIDATES = {
    "float32 onednn": (torch.float32, onednn), "float32 transposed": (torch.float32, transposed),
    "float32 sumwx": (torch.float32, sumwx), "bfloat16 onednn": (torch.bfloat16, onednn),
    "bfloat16 linear": (torch.bfloat16, linear), "bfloat16 transposed": (torch.bfloat16, transposed),
    "bfloat16 sumwx": (torch.bfloat16, sumwx), "int8 pack": (torch.bfloat16, int8pack),
    "int8 sumwx": (torch.bfloat16, int8sumwx),
}
built, skipped = {}, {}
with torch.inference_mode():
    for name, (dtype, make) in CANDIDATES.items():
        ws = [w.to(dtype) for w in W32]
        try:
            fns = make(ws)
        except RuntimeError as e:  # oneDNN without a bfloat16 path on this CPU
            skipped[name] = str(e).splitlines()[0]
            continue
        xs = [x.to(dtype) for x in X32]
        for fn, x in zip(fns, xs, strict=True):
            fn(x)  # compiles, warms
        built[name] = (fns, xs, sum(w.numel() for w in ws) * (1 if "int8" in name else ws[0].element_size()))
    times = {name: [] for name in built}
    for _ in range(15):
        for name, (fns, xs, _nbytes) in built.items():
            t = time.perf_counter()
            for fn, x in zip(fns, xs, strict=True):
                fn(x)
            times[name].append(time.perf_counter() - t)
result = {"threads": threads, "candidates": {}, "skipped": skipped}
for name, (_fns, _xs, nbytes) in built.items():
    ms = statistics.median(times[name]) * 1e3
    result["candidates"][name] = {"ms": ms, "gb_per_s": nbytes / ms / 1e6, "mb": nbytes / 1e6}
    print(f"{name:20s} {ms:7.2f} ms  {nbytes / ms / 1e6:6.1f} GB/s  ({nbytes / 1e6:.0f} MB)")
for name, why in skipped.items():
    print(f"{name:20s} not available: {why}")
if len(sys.argv) > 2:
    result["machine"] = machine()
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)
