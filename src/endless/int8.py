"""int8 weight-only linears for the per-token path (issue 21, part 2: ``--weights int8``).

Each weight matrix W (out, in) is stored as int8 with one scale per output channel
(symmetric: ``scale = absmax(W[o]) / 127``, ``Wq = round(W / scale)``), activations stay
bfloat16: ``y = (x @ Wq^T) * scale + b``. Half the bytes of bfloat16 weights, so half the
bytes streamed per decoded token.

Kernels, all PyTorch's own ops, chosen by measurement (AMD EPYC, AVX512-BF16/VNNI, no AMX,
one thread; microseconds per call, bf16 activations; ``oneDNN bf16`` is what ``--weights auto``
runs, ``endless.packed``):

====================  ====  ===========  ==========================  =================
matrix (out x in)     rows  oneDNN bf16  ``_weight_int8pack_mm``     dequantise + mm
====================  ====  ===========  ==========================  =================
q/k/v  960 x 576         1         23.6  15.3                        261
gate/up 3072 x 576       1         54.3  44.2                        781
down    576 x 1536       1         32.4  22.5                        352
LM head 49152 x 576      1         1366  1542                        88000
gate/up 3072 x 576      16            -  359                         382
gate/up 3072 x 576      32            -  742                         521
gate/up 3072 x 576     128          932  3047                        1480
====================  ====  ===========  ==========================  =================

- Fewer than ``CHUNK_ROWS`` rows (a decoded token, small chunks): ``_weight_int8pack_mm``,
  0.65-0.8x oneDNN's bf16 time on the decoder matrices when they sit in cache. It is
  compute-bound (~12-18 G weights/s), so once the weights stream from memory, as in a real
  decode, it gains little: over all 211 products of a SmolLM2-135M token it takes the same
  time as oneDNN bf16 (10.7 ms per token both, torch profiler, 20 tokens), and a whole decoded
  token at cache 256 takes 0.93-0.94x the bf16 time (attention, norms and dispatch are the rest).
- Chunks of ``CHUNK_ROWS`` rows or more (prefill, chunked perplexity): int8pack's time grows
  linearly with the rows (~24 us per row of gate/up), so the weight is widened to bfloat16 for
  the call (exact: every int8 is a bfloat16) and multiplied by ``F.linear``, the scale applied to
  the output; ~1.3-1.6x oneDNN's time at 128 rows, with no second, wide copy kept in memory.
- float32 activations are refused: ``_weight_int8pack_mm`` takes 20-60x oneDNN's bf16 time
  with them (1199 us for gate/up), which no decode could want.
- Measured and not used, because they quantise the activations too (no longer weight-only,
  and the quality target fails): per-row symmetric int8 activations through ``torch._int_mm``
  (VNNI; ``activations="int8"`` below): 0.88x the bf16 decode time but perplexity 5.12 against
  4.75 (+7.9 %) on 2048 tokens of the demo text, where weight-only int8 gives 4.76 (+0.3 %);
  the x86/fbgemm engine's ``quantized.linear_dynamic`` (per-tensor uint8 activations): 0.75x
  the bf16 decode time, but the same kind of activation error, and those ops are deprecated.

Contract: ``int8_linear(w, bias)`` computes ``F.linear(x, dequantize(*quantize(w)), bias)`` up to
bfloat16 rounding, for any number of rows; every route is probed against that reference when
built (``agrees``); one that is missing or disagrees falls back to the widening one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from endless.cpu import onednn_bfloat16

log = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]
CHUNK_ROWS = 32  # from this many rows on, dequantise + F.linear beats int8pack (table above: crossover 16-32)


def quantize(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(Wq (out, in) int8, scale (out,) in dtype)``.

    The scale is rounded to ``dtype`` before quantising, so ``Wq * scale`` is exactly the
    weight the kernels multiply by (the kernels take the scale in the activations' dtype)."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(dtype)
    wq = torch.round(wf / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return wq, scale


def dequantize(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight ``Wq * scale`` in the scale's dtype (the reference the kernels are probed against)."""
    return (wq.float() * scale.float()[:, None]).to(scale.dtype)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x2`` (M, in) as symmetric int8 with its own float32 scale (M, 1)."""
    xf = x2.float()
    sx = xf.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30) / 127
    return torch.round(xf / sx).to(torch.int8), sx


def int8_linear(w: torch.Tensor, bias: torch.Tensor | None, *, activations: str = "bfloat16") -> LinearFn:
    """``x -> F.linear(x, dequantize(*quantize(w)), bias)`` from an int8 copy of ``w`` (module docstring).

    ``w`` is the (fused) bfloat16 weight. ``activations="bfloat16"`` (what ``--weights int8``
    runs): weight-only, ``_weight_int8pack_mm`` below ``CHUNK_ROWS`` rows, widened above.
    ``"int8"``: every input row is also quantised on the fly and multiplied in int8
    (``torch._int_mm``, VNNI) -- measured, not used: +7.9 % perplexity (module docstring). The function carries
    ``nbytes`` (int8 weights and scales) and ``int8 = True``."""
    if w.dtype != torch.bfloat16:
        raise ValueError(f"int8 weights run bfloat16 activations, got {w.dtype} weights")
    wq, scale = quantize(w, w.dtype)
    bias = None if bias is None else bias.detach().to(w.dtype)
    out_features = wq.shape[0]
    wt, scale32 = wq.t(), scale.float()  # (in, out) view of the (out, in) rows: _int_mm's fast layout

    def dynamic(x2: torch.Tensor) -> torch.Tensor:
        # int32 sums are exact (in * 127 * 127 < 2**31 for in < 133k), so a row's result does not
        # depend on the rows around it: chunked and token-by-token agree exactly
        qx, sx = quantize_rows(x2)
        y = (torch._int_mm(qx, wt).float() * sx * scale32).to(x2.dtype)
        return y if bias is None else y + bias

    # every int8 is exact in bfloat16 and float32: widen for each call only, scale the (fewer) outputs;
    # in float32 where oneDNN has no bfloat16 path (AVX2: PyTorch's bfloat16 GEMM is 4-5x slower there)
    wide = torch.bfloat16 if onednn_bfloat16() else torch.float32

    def widened(x2: torch.Tensor) -> torch.Tensor:
        y = (F.linear(x2.to(wide), wq.to(wide)) * scale.to(wide)).to(x2.dtype)
        return y if bias is None else y + bias

    def int8pack(x2: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x2, wq, scale)
        return y if bias is None else y + bias

    def probed(fn: LinearFn, tol: float) -> bool:
        return all(agrees(fn, wq, scale, bias, rows=r, tol=tol) for r in (1, 3, CHUNK_ROWS + 1))

    if activations == "int8" and hasattr(torch, "_int_mm") and probed(dynamic, 5e-2):
        small = large = dynamic
    else:
        if activations == "int8":
            log.warning("torch._int_mm is missing or disagrees; int8 weights run with bfloat16 activations")
        small = int8pack if hasattr(torch.ops.aten, "_weight_int8pack_mm") and probed(int8pack, 3e-2) else widened
        large = widened

    def linear(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = small(x2) if x2.shape[0] < CHUNK_ROWS else large(x2)
        return y.view(*x.shape[:-1], out_features)

    linear.nbytes = wq.numel() + scale.numel() * scale.element_size()  # type: ignore[attr-defined]
    linear.int8 = True  # type: ignore[attr-defined]
    linear.dynamic = small is dynamic  # type: ignore[attr-defined]
    return linear


def agrees(fn: LinearFn, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *, rows: int = 3,
           tol: float = 3e-2) -> bool:
    """``fn`` equals ``F.linear`` on the dequantised weight for a random (rows, in) probe (bf16 tolerance)."""
    return agrees_with(fn, dequantize(wq, scale), bias, rows=rows, tol=tol)


def agrees_with(fn: LinearFn, weight: torch.Tensor, bias: torch.Tensor | None, *, rows: int = 3,
                tol: float = 3e-2) -> bool:
    """``fn`` equals ``F.linear`` on ``weight`` (what a quantised kernel should multiply by) for a
    random (rows, in) probe in the weight's dtype, within ``tol`` of the output's largest value."""
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    try:
        with torch.no_grad():
            got = fn(x).float()
            want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())))
