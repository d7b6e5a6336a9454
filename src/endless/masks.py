"""Attention visibility as small composable functions of (query index, key index).

Every policy's mask is built from these, on absolute stream indices (int64 tensors that
broadcast against each other, e.g. ``q[:, None]`` and ``k[None, :]``). They return boolean
tensors: True where the query may attend to the key. The same functions serve the ring-buffer
runtime (on the indices held in each slot) and the dense oracles (on full index grids), which
keeps "policy equals dense while the stream fits" a statement about one definition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A query sees itself and the past."""
    return k <= q


def recent(window: int) -> MaskFn:
    """The query and the ``window`` tokens before it (docs/methods.md section 1, window attention)."""

    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q - k) <= window

    return fn


def first(n: int) -> MaskFn:
    """The first ``n`` tokens of the stream: the attention sinks (docs/methods.md section 2)."""

    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return k < n

    return fn


def block_window(block: int, memory: int) -> MaskFn:
    """BSWA: the query's own block and the ``memory`` blocks before it (docs/methods.md section 1)."""

    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.div(k, block, rounding_mode="floor") >= torch.div(q, block, rounding_mode="floor") - memory

    return fn


def any_of(*fns: MaskFn) -> MaskFn:
    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = fns[0](q, k)
        for f in fns[1:]:
            out = out | f(q, k)
        return out

    return fn


def all_of(*fns: MaskFn) -> MaskFn:
    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out = fns[0](q, k)
        for f in fns[1:]:
            out = out & f(q, k)
        return out

    return fn
