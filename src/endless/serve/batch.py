"""One decoding step of several streams at different positions, in one forward pass.

Contract: ``decode_step(streams, tokens)`` reads token ``tokens[i]`` into ``streams[i]`` for every
i and returns the (K, V) float32 logits after it, exactly as ``streams[i].feed`` of that token
alone would (tests/test_serve_batch.py: log-probs equal within 1e-5 in float32).

Why it is exact without a new attention path: the weight products, the expensive part of a
decoded token, treat the K rows independently, so they run batched; only attention mixes a row
with its own history, and ``MultiCache`` hands row i to stream i's own state (``RingKV`` or
``FamState``, each of batch 1 with its own positions, slots and RoPE tables). A FAM state's
``end()`` runs its memory update when its block completes, whichever the other rows' positions.

With a ``PoolSet`` (``endless.serve.pool``) the ring states of the batch move into rows of one
tensor per ring size and attend in one call per layer and size instead of one per stream: the
same numbers, a dozen tensor ops per layer whatever the batch size. The others (FAM, dense) still
attend on their own.

A step of one stream is that stream's own one-token forward (``state.forward``, what
``Stream.feed`` runs), so a model with a compiled decode step (``endless.step``) decodes a lone
conversation through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from endless.serve.pool import KVPool, PoolSet
from endless.stream import Stream


class MultiCache:
    """The ``Cache`` protocol over K single-stream states: row i of every tensor is state i's.
    With ``pool``, one-token steps of the states it can hold attend through it, one group (ring
    size) at a time."""

    def __init__(self, states: Sequence, pool: PoolSet | None = None) -> None:
        for s in states:
            if not hasattr(s, "attend") or s.batch != 1:
                raise ValueError(f"{type(s).__name__} cannot be decoded in a batch (needs a batch-1 cache state)")
        self.states = list(states)
        self.pool = pool
        # (pool, indices of the states it serves, the same as a tensor) this step
        self._groups: list[tuple[KVPool, list[int], torch.Tensor]] = []
        self._alone: list[int] = list(range(len(self.states)))

    def begin(self, n: int) -> None:
        for s in self.states:
            s.begin(n)
        self._groups, self._alone = [], list(range(len(self.states)))
        if self.pool is not None and n == 1 and len(self.states) > 1:
            device = self.pool.model.device
            self._groups = [(pool, idx, torch.tensor(idx, device=device)) for pool, idx in self.pool.groups(self.states)]
            served = {i for _, idx, _ in self._groups for i in idx}
            self._alone = [i for i in range(len(self.states)) if i not in served]
            for pool, idx, _ in self._groups:
                pool.begin([self.states[i] for i in idx])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if len(self.states) == 1:
            return self.states[0].attend(layer, q, k, v)
        if not self._groups:
            return torch.cat([s.attend(layer, q[i : i + 1], k[i : i + 1], v[i : i + 1])
                              for i, s in enumerate(self.states)])
        if not self._alone and len(self._groups) == 1:
            return self._groups[0][0].attend(layer, q, k, v)
        out = torch.empty_like(q)
        for pool, _, at in self._groups:
            out[at] = pool.attend(layer, q[at], k[at], v[at])
        for i in self._alone:
            out[i : i + 1] = self.states[i].attend(layer, q[i : i + 1], k[i : i + 1], v[i : i + 1])
        return out

    def end(self) -> None:
        for s in self.states:
            s.end()


def batchable(stream: Stream) -> bool:
    """Whether ``stream`` can join a batched step (one sequence, a cache state, a prompt read)."""
    return stream.batch == 1 and hasattr(stream.state, "attend") and stream.last_logits is not None


@torch.inference_mode()
def decode_step(streams: Sequence[Stream], tokens: "Sequence[int] | torch.Tensor", *,
                pool: PoolSet | None = None) -> torch.Tensor:
    """Feed one token to each stream (all over the same model) in one forward pass; returns the
    (K, V) float32 logits of the next token of each, also left in each stream's ``last_logits``.
    ``pool``: the ring states it can hold attend together (``endless.serve.pool``)."""
    if not streams:
        raise ValueError("no streams to decode")
    model = streams[0].model
    if any(s.model is not model for s in streams):
        raise ValueError("batched streams must share one model")
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(len(streams), 1).to(model.device)
    if len(streams) == 1 and batchable(streams[0]):
        logits = streams[0].state.forward(ids, last_only=True)[:, -1].float()
    else:
        logits = model.forward(ids, MultiCache([s.state for s in streams], pool), last_only=True)[:, -1].float()
    for i, s in enumerate(streams):
        s.last_logits = logits[i : i + 1]
        s.fed += 1
    return logits


__all__ = ["MultiCache", "batchable", "decode_step"]
