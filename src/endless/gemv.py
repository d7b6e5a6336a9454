"""Compiled matrix-vector products for the one-token path (issue 5: a lean per-token path).

Decoding one token multiplies one row by every weight matrix, so the token's time is the time to
stream the weights through the kernel. For float32 the kernels eager PyTorch offers stop well
short of the memory bandwidth on this project's CPU (one thread, SmolLM2-135M's 120 fused layer
matrices: ``F.linear`` 16 GB/s, oneDNN's prepacked weights 22 GB/s). TorchInductor's C++ GEMM
template, compiled for one input row with the weight frozen into the kernel (so it is laid out
for the micro-kernel once, at compile time), streams 31-34 GB/s on the same matrices and 36 GB/s
on the LM head: 1.4x. For bfloat16 the same kernel is slower than oneDNN's (12 against 24 GB/s),
so only float32 is compiled.

``compiled_gemv(w, bias)`` compiles ``x -> F.linear(x, w, bias)`` for x of shape (1, in) through
``torch._inductor.compile`` (inductor without dynamo: no guards, no recompilation, one artifact
per matrix; matrices of the same shape share the generated C++). Contract:

- Only for one row: callers route any other number of rows to another kernel.
- A snapshot: the kernel keeps its own (packed) copy of ``w``; later edits of ``w`` are not seen.
- Compiled for the thread count current at compile time.
- Returns None when this torch cannot compile here (no C++ compiler, unsupported build); the
  caller then keeps its eager kernel. The first call of a shape costs seconds (autotuning and a
  C++ build), later ones well under a second, ~20-60 s for a 135M model in all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# freezing: weights become constants the kernel may re-layout at compile time (the whole gain);
# max_autotune with the C++ backend: lets inductor pick its GEMM template over the aten call.
# freezing_discard_parameters: the graph's own copy of the weight is dropped once the kernel has
# its packed one (without it a compiled matrix costs three copies of the weight, not one).
# AUTOTUNE is also what endless.step adds to the graphs it autotunes; its last two keys keep the
# autotuner from printing a table per product (~200 lines for a model) on a user's terminal.
AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
            "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
OPTIONS = {"freezing": True, "freezing_discard_parameters": True, **AUTOTUNE}


class _Linear(torch.nn.Module):
    """The graph to compile: one linear map whose weight and bias are module attributes."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(w.detach(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


_unavailable: list[str] = []  # the first failure's reason: later calls give up at once, without a warning each


def compiled_gemv(w: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x (1, in) -> x @ w.T + bias`` as a compiled kernel, or None if it cannot be built here."""
    if w.dtype != torch.float32 or w.device.type != "cpu" or _unavailable:
        return None
    try:
        import torch._inductor as inductor

        # clones: discarding the graph's parameters frees their storage, which must not be the caller's
        gm = torch.fx.symbolic_trace(_Linear(w.detach().clone(), None if bias is None else bias.detach().clone()))
        example = torch.zeros(1, w.shape[1], dtype=w.dtype)
        with torch.no_grad():
            fn = inductor.compile(gm, [example], options=OPTIONS)
            out = fn(torch.ones_like(example))
    except Exception as e:  # inductor raises many kinds (compiler missing, lowering, ...)
        _unavailable.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        log.warning("cannot compile matrix-vector kernels here (%s); using the eager ones", _unavailable[0])
        return None
    if not isinstance(out, torch.Tensor) or out.shape != (1, w.shape[0]):
        return None
    return fn
