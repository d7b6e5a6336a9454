"""One ring-buffer KV state for dense, window, sinks and BSWA (PAPERS.md sections 1-2).

Layout per layer: ``k, v`` of shape (B, KV, S + R, D) allocated once. Slots [0, S) hold the S
sinks forever; slots [S, S+R) are a ring: the key of stream index j >= S lives in slot
``S + (j - S) % R``. ``slot_pos`` records the stream index in each slot (-1 = empty), and the
policy's mask function, applied to (query index, slot_pos), decides visibility. So one
definition of the policy serves the runtime and the dense oracles.

Why R = span + chunk: a chunk of C new tokens is written before attention, and its earliest
query still needs the oldest key of its window. With R >= window + C nothing needed is
overwritten, so chunked processing is exact: every query sees exactly the keys it would see
token by token. Dense has no ring: its buffer doubles when full (it is the reference, not a
streaming policy).

Positions: keys are rotated once at their absolute stream index (float64 angles, see
``endless.rope``) and never touched again. Queries are rotated at their absolute index, which
gives every window key its true distance. For sinks the in-cache distance of sink j is
``min(t, S+W) - j``: the sink columns of the score matrix are recomputed with the query rotated
a second time at ``min(t, S+W)``. That costs S columns per token instead of re-rotating the cache.

Constant memory: after construction nothing is allocated that grows with the stream; per step
the temporaries are O(chunk x (S+R)).
"""

from __future__ import annotations

import torch

from endless.config import Policy, Sinks
from endless.model import Transformer, gqa_mix, gqa_scores, masked_softmax
from endless.rope import rotate

DENSE_INITIAL = 1024


class RingKV:
    """The state of ``batch`` streams under one policy: KV buffers, slot indices, position."""

    def __init__(self, model: Transformer, policy: Policy, *, batch: int = 1, chunk: int = 128) -> None:
        self.model = model
        self.policy = policy
        self.batch = batch
        self.chunk = chunk
        self.n_sinks = policy.n_sinks
        ring = policy.ring_size(chunk)
        self.growable = ring is None
        self.ring = ring if ring is not None else DENSE_INITIAL
        self.mask_fn = policy.mask()
        d = model.dims
        shape = (d.n_layers, batch, d.n_kv_heads, self.n_sinks + self.ring, d.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.slot_pos = torch.full((self.n_sinks + self.ring,), -1, dtype=torch.long)
        self.t = 0  # stream indices seen so far
        self._step: _Step | None = None

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.n_sinks + self.ring

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        s = self.n_sinks
        return torch.where(positions < s, positions, s + (positions - s) % self.ring)

    def _grow(self, needed: int) -> None:
        new = self.ring
        while new < needed:
            new *= 2
        pad = new - self.ring
        self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:3], pad, self.k.shape[-1])], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:3], pad, self.v.shape[-1])], dim=3)
        self.slot_pos = torch.cat([self.slot_pos, self.slot_pos.new_full((pad,), -1)])
        self.ring = new

    def begin(self, n: int) -> None:
        """Prepare positions, slots, mask and RoPE tables for the next ``n`` tokens (all layers)."""
        if n > self.chunk and not self.growable:
            raise ValueError(f"chunk of {n} tokens exceeds the state's chunk size {self.chunk}")
        if self.growable and self.t + n > self.capacity:
            self._grow(self.t + n)
        pos = torch.arange(self.t, self.t + n)
        slots = self.slots(pos)
        self.slot_pos[slots] = pos
        kpos = self.slot_pos
        mask = (kpos[None, :] >= 0) & self.mask_fn(pos[:, None], kpos[None, :])  # (C, N)
        rope, dtype = self.model.rope, self.model.dtype
        cos, sin = rope.tables(pos, dtype)
        sink = None
        if isinstance(self.policy, Sinks) and self.n_sinks and int(pos[-1]) > self.policy.sinks + self.policy.window:
            sink = rope.tables(self.policy.sink_query_positions(pos), dtype)
        self._step = _Step(pos, slots, mask, cos, sin, sink)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self._step
        k = rotate(k, st.cos, st.sin)
        kbuf, vbuf = self.k[layer], self.v[layer]  # (B, KV, N, D)
        kbuf.index_copy_(2, st.slots, k)
        vbuf.index_copy_(2, st.slots, v)
        scale = self.model.scale
        scores = gqa_scores(rotate(q, st.cos, st.sin) * scale, kbuf)  # (B, KV, G, C, N)
        if st.sink is not None:
            # Sinks sit at in-cache positions 0..S-1 and the query at min(t, S+W).
            qs = rotate(q, *st.sink) * scale
            scores[..., : self.n_sinks] = gqa_scores(qs, kbuf[:, :, : self.n_sinks])
        p = masked_softmax(scores, st.mask, vbuf.dtype)
        return gqa_mix(p, vbuf)

    def end(self) -> None:
        self.t += int(self._step.pos.numel())
        self._step = None

    def forward(self, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Feed ids (B, C) with C <= chunk; returns logits (B, C or 1, V)."""
        self.begin(ids.shape[1])
        try:
            return self.model.forward(ids, self, last_only=last_only)
        finally:
            self.end()

    # -- save / restore ---------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "slot_pos": self.slot_pos}

    def load_tensors(self, tensors: dict[str, torch.Tensor], t: int) -> None:
        if self.growable:
            self.ring = tensors["k"].shape[3] - self.n_sinks
            self.k = tensors["k"].clone()
            self.v = tensors["v"].clone()
            self.slot_pos = tensors["slot_pos"].clone()
        else:
            for name, buf in self.state_tensors().items():
                if tuple(tensors[name].shape) != tuple(buf.shape):
                    raise ValueError(f"{name}: shape {tuple(tensors[name].shape)} != {tuple(buf.shape)}")
                buf.copy_(tensors[name])
        self.t = t


class _Step:
    __slots__ = ("pos", "slots", "mask", "cos", "sin", "sink")

    def __init__(self, pos, slots, mask, cos, sin, sink):
        self.pos, self.slots, self.mask, self.cos, self.sin, self.sink = pos, slots, mask, cos, sin, sink


__all__ = ["RingKV"]
