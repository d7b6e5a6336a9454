"""int4 weight-only linears for the per-token path (issue 21, part 2's option: ``--weights int4``).

Each weight matrix W (out, in) is cut into groups of ``GROUP`` = 32 inputs per output channel;
a group is stored as 4-bit codes q in 0..15 with its own scale s and the value z of code 8
(asymmetric: ``w = (q - 8) * s + z``, s = (max - min) / 15 of the group), activations stay
bfloat16. This is the layout of PyTorch's CPU int4 kernel ``_weight_int4pack_mm_for_cpu`` and
the grid of GGUF's Q4_1 blocks (32 weights, a scale and a minimum), which is the format the
embedded SmolLM2 ships in: where a Q4_1 block uses its lowest and highest code, its weights come
back exactly (up to the bfloat16 rounding of s and z).

Kernels (AMD EPYC, AVX512-BF16, one thread, microseconds per call, bf16 activations, against
oneDNN's prepacked bf16 weights that ``--weights auto`` runs):

====================  ====  ===========  ==========================
matrix (out x in)     rows  oneDNN bf16  ``_weight_int4pack_mm``
====================  ====  ===========  ==========================
q/k/v  960 x 576         1           28  18 (0.66x)
gate/up 3072 x 576       1          140  90 (0.64x)
down    576 x 1536       1           40  36 (0.90x)
LM head 49152 x 576      1         2150  844 (0.39x)
gate/up 3072 x 576      16          278  344 (1.24x)
gate/up 3072 x 576      64          486  2638 (5.4x)
====================  ====  ===========  ==========================

(measured with two other processes on the machine's two cores: ratios, not absolute times.)
The int4 kernel's time grows with the rows, so inputs of ``CHUNK_ROWS`` rows or more (prefill,
chunked scoring) widen the weight to bfloat16 for the call from a byte-per-weight copy of the
codes, and multiply with ``F.linear``: chunks run slower than bfloat16's, decoded tokens faster.
Memory: 0.5 byte per weight for the packed codes, 1 for the chunk copy, 4 per group of 32 for s
and z: ~1.6 bytes per weight against bfloat16's 2 (the point is bytes streamed per decoded
token, 0.5 per weight, not the resident size).

Quality (``endless eval ppl --dtype bfloat16 --weights int4 --policy sinks:4+1020 --tokens 4096``,
the demo text): perplexity 5.626 against bfloat16's 5.624 (+0.04 %) with the LM head kept at int8
(``endless.packed.HEAD_QUANT``); 5.895 (+4.8 %) with the head at int4 too.

Contract: ``int4_linear(w, bias)`` computes ``F.linear(x, dequantize(*quantize(w)), bias)`` up
to bfloat16 rounding for any number of rows; the int4 kernel is probed against that reference
when built and, missing or disagreeing (a shape it does not take), is replaced by the widening
route for every input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from endless.int8 import agrees_with

log = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]
GROUP = 32
CHUNK_ROWS = 8  # from this many rows on, widening beats the int4 kernel (table above: 1.24x at 16)
INNER_K_TILES = 8  # the packing's tile parameter (PyTorch's int4 CPU kernel takes 2, 4 or 8)


def quantize(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes (out, in) uint8 in 0..15, scale (out, in/GROUP), zero (out, in/GROUP))``, the
    scale and the zero (the value of code 8) rounded to ``dtype`` before the codes are taken, so
    ``dequantize`` gives exactly the weight the kernel multiplies by."""
    out_f, in_f = w.shape
    if in_f % GROUP:
        raise ValueError(f"int4 weights need inputs in groups of {GROUP}, got {in_f}")
    g = w.detach().float().reshape(out_f, in_f // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    codes = torch.round((g - z) / s + 8).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(out_f, in_f), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - 8) * s + z`` per group, in the scale's dtype."""
    out_f, in_f = codes.shape
    g = codes.reshape(out_f, in_f // GROUP, GROUP).float()
    return ((g - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(out_f, in_f).to(scale.dtype)


def int4_linear(w: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    """``x -> F.linear(x, dequantize(*quantize(w)), bias)`` from 4-bit codes (module docstring).
    ``w`` is the (fused) bfloat16 weight. The function carries ``nbytes`` and ``int4 = True``."""
    if w.dtype != torch.bfloat16:
        raise ValueError(f"int4 weights run bfloat16 activations, got {w.dtype} weights")
    codes, scale, zero = quantize(w, w.dtype)
    bias = None if bias is None else bias.detach().to(w.dtype)
    out_features = codes.shape[0]
    reference = dequantize(codes, scale, zero)

    def widened(x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, dequantize(codes, scale, zero), bias)

    small, packed_bytes = widened, 0
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is not None and convert is not None:
        try:
            packed = convert(codes.to(torch.int32), INNER_K_TILES)
            # the kernel's (in/GROUP, out, 2) table of [scale, zero] pairs
            table = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()

            def int4pack(x2: torch.Tensor) -> torch.Tensor:
                y = op(x2, packed, GROUP, table)
                return y if bias is None else y + bias

            if all(agrees_with(int4pack, reference, bias, rows=r) for r in (1, 3)):
                small, packed_bytes = int4pack, packed.numel() * packed.element_size() + table.numel() * 2
        except (RuntimeError, NotImplementedError) as e:
            log.debug("int4 kernel unavailable for %s: %s", tuple(w.shape), e)
    del reference

    def linear(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = small(x2) if x2.shape[0] < CHUNK_ROWS else widened(x2)
        return y.view(*x.shape[:-1], out_features)

    linear.nbytes = packed_bytes + codes.numel() + 2 * (scale.numel() + zero.numel())  # type: ignore[attr-defined]
    linear.int4 = True  # type: ignore[attr-defined]
    linear.kernel = "int4" if small is not widened else "int4-widened"  # type: ignore[attr-defined]
    return linear
