"""Sliding window with re-computation (docs/methods.md section 1): the slow, sound baseline.

For every new token t the model is run from scratch on tokens [t-W, t] at positions 0..W (fewer
at the start of the stream, where the window is the whole prefix). Nothing but the last W token
ids is kept between steps, so memory is constant and time per token is O(W^2) by design: this
is what StreamingLLM's 22x speed-up is measured against.

Exactness: while t <= W the window is the stream prefix and one causal pass gives every such
token at once; past that each window is an independent sequence, run in small batches
(``window_logits``: the one definition, which perplexity evaluation and ``endless verify`` use too).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from endless.policies.ring import RingKV
from endless.policies.spec import Dense, Recompute
from endless.transformer import Transformer

WINDOWS_PER_BATCH = 8  # bounds the (windows x heads x W x W) score tensor


def dense_logits(model: Transformer, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
    """Logits of ``ids`` (B, L) read afresh from position 0 under dense attention."""
    return RingKV(model, Dense(), batch=ids.shape[0], chunk=ids.shape[1]).forward(ids, last_only=last_only)


def window_logits(model: Transformer, seq: torch.Tensor, ends: Sequence[int], window: int, *,
                  forward: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """(B, len(ends), V): for each index e of ``ends`` the logits at e when the model reads
    ``seq[:, max(0, e - window) : e + 1]`` afresh at positions 0.. -- the re-computation baseline,
    defined once. Indices whose window is the whole prefix (e <= window) share one causal pass;
    the others run in batches of ``WINDOWS_PER_BATCH`` windows of window + 1 tokens, the LM head on
    their last position only. ``forward(ids (n, L), last_only=) -> logits (n, L or 1, V)``
    replaces our dense path, e.g. with transformers' own forward (``endless verify``'s oracle)."""
    if forward is None:
        forward = functools.partial(dense_logits, model)
    b = seq.shape[0]
    out: dict[int, torch.Tensor] = {}
    head = [e for e in ends if e <= window]
    if len(head) == 1:  # one token (a decode step at e == window): the LM head on its position only
        out[head[0]] = forward(seq[:, : head[0] + 1], last_only=True)[:, -1]
    elif head:
        logits = forward(seq[:, : max(head) + 1])
        out.update({e: logits[:, e] for e in head})
    tail = [e for e in ends if e > window]
    for lo in range(0, len(tail), WINDOWS_PER_BATCH):
        group = tail[lo : lo + WINDOWS_PER_BATCH]
        windows = torch.stack([seq[:, e - window : e + 1] for e in group], dim=1)  # (B, g, W+1)
        logits = forward(windows.reshape(-1, window + 1), last_only=True)[:, -1].view(b, len(group), -1)
        out.update({e: logits[:, i] for i, e in enumerate(group)})
    return torch.stack([out[e] for e in ends], dim=1)


class RecomputeState:
    """Token-id ring of ``batch`` streams under the re-computation policy."""

    def __init__(self, model: Transformer, policy: Recompute, *, batch: int = 1, chunk: int = 128) -> None:
        self.model = model
        self.policy = policy
        self.batch = batch
        self.chunk = chunk
        self.history = torch.zeros(batch, policy.window, dtype=torch.long, device=model.device)  # last W ids, oldest first
        self.t = 0

    def forward(self, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        w = self.policy.window
        c = ids.shape[1]
        kept = min(self.t, w)
        seq = torch.cat([self.history[:, w - kept :], ids], dim=1)  # (B, kept + C)
        # the new tokens sit at kept..kept+C-1 of seq; while the stream is shorter than the
        # window, seq is the whole stream, so a window cut at 0 is the stream's prefix
        ends = [kept + c - 1] if last_only else list(range(kept, kept + c))
        out = window_logits(self.model, seq, ends, w)
        self.history = seq[:, -w:] if seq.shape[1] >= w else torch.cat(
            [self.history[:, seq.shape[1] :], seq], dim=1
        )
        self.t += c
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"history": self.history}

    def load_tensors(self, tensors: dict[str, torch.Tensor], t: int) -> None:
        self.history = tensors["history"].to(self.model.device, copy=True)
        self.t = t
