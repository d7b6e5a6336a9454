"""What this CPU's PyTorch kernels can do, probed once per process (issue 21: every CPU)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def onednn_bfloat16() -> bool:
    """Whether oneDNN can pack bfloat16 weights here (it needs AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX).

    Where it cannot (an AVX2-only CPU), PyTorch's bfloat16 products fall back to far slower code:
    on an AMD EPYC Zen 3, a 64-row chunk of SmolLM2's products took 4-5x float32's time and a
    one-row product on an (in, out) copy of the weight 19x (``benchmarks/bench-zen3``)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not hasattr(ops, "_reorder_linear_weight") or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops._reorder_linear_weight(torch.ones(16, 16, dtype=torch.bfloat16), 1)
    except (RuntimeError, NotImplementedError):
        return False
    return True


__all__ = ["onednn_bfloat16"]
