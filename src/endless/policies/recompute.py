"""Sliding window with re-computation (docs/methods.md section 1): the slow, sound baseline.

For every new token t the model is run from scratch on tokens [t-W, t] at positions 0..W (fewer
at the start of the stream, where the window is the whole prefix). Nothing but the last W token
ids is kept between steps, so memory is constant and time per token is O(W^2) by design: this
is what StreamingLLM's 22x speed-up is measured against.

Exactness: while t <= W the window is the stream prefix and one causal pass gives every such
token at once; past that each window is an independent sequence, run in small batches.
"""

from __future__ import annotations

import torch

from endless.policies.spec import Dense, Recompute
from endless.transformer import Transformer

WINDOWS_PER_BATCH = 8  # bounds the (windows x heads x W x W) score tensor


class RecomputeState:
    """Token-id ring of ``batch`` streams under the re-computation policy."""

    def __init__(self, model: Transformer, policy: Recompute, *, batch: int = 1, chunk: int = 128) -> None:
        self.model = model
        self.policy = policy
        self.batch = batch
        self.chunk = chunk
        self.history = torch.zeros(batch, policy.window, dtype=torch.long, device=model.device)  # last W ids, oldest first
        self.t = 0

    def _fresh(self, ids: torch.Tensor, last_only: bool) -> torch.Tensor:
        from endless.policies.ring import RingKV

        state = RingKV(self.model, Dense(), batch=ids.shape[0], chunk=ids.shape[1])
        return state.forward(ids, last_only=last_only)

    def forward(self, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        w = self.policy.window
        b, c = ids.shape
        kept = min(self.t, w)
        seq = torch.cat([self.history[:, w - kept :], ids], dim=1)  # (B, kept + C)
        outs = []
        # Tokens whose window is still the whole stream prefix: one causal pass.
        n_prefix = max(0, min(c, w + 1 - self.t))
        if n_prefix:
            logits = self._fresh(seq[:, : kept + n_prefix], last_only=False)[:, kept:]
            outs.append(logits)
        # Tokens past that: each its own window of W+1 tokens.
        starts = [kept + i - w for i in range(n_prefix, c)]
        if last_only and starts:
            starts = starts[-1:]
            outs = []
        for lo in range(0, len(starts), WINDOWS_PER_BATCH):
            group = starts[lo : lo + WINDOWS_PER_BATCH]
            windows = torch.stack([seq[:, s : s + w + 1] for s in group], dim=1)  # (B, g, W+1)
            logits = self._fresh(windows.reshape(-1, w + 1), last_only=True)  # (B*g, 1, V)
            outs.append(logits.view(b, len(group), -1))
        self.history = seq[:, -w:] if seq.shape[1] >= w else torch.cat(
            [self.history[:, seq.shape[1] :], seq], dim=1
        )
        self.t += c
        out = torch.cat(outs, dim=1)
        return out[:, -1:] if last_only else out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"history": self.history}

    def load_tensors(self, tensors: dict[str, torch.Tensor], t: int) -> None:
        self.history = tensors["history"].to(self.model.device, copy=True)
        self.t = t
