"""One ring-buffer KV state for dense, window, sinks and BSWA (docs/methods.md sections 1-2).

Layout per layer: ``k, v`` of shape (B, KV, S + R, D) allocated once, laid out by
``endless.attention.Slots``: slots [0, S) hold the S sinks forever; slots [S, S+R) are a ring:
the key of stream index j >= S lives in slot ``S + (j - S) % R``. The slots' stream indices and
the policy's mask function, applied to (query index, slot index), decide visibility. So one
definition of the policy serves the runtime and the dense oracles. The attention itself is
``endless.attention.Kernel``'s, as for every other path.

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
the temporaries are O(chunk x (S+R)), and a chunk's score matrix lives in the kernel's reused
buffer (with the same fix for the log-probabilities in ``endless.stream``, bfloat16 chunked
perplexity went from 687 to 799-905 tokens/s on one core).

Per-token cost (issue 5): everything that depends only on the step -- the additive mask, the
RoPE tables with the attention scale folded into the query's, the sinks' tables (constant once
the stream is past S+W, so cached) -- is built once in ``begin`` and shared by all layers;
``attend`` is then a dozen tensor ops per layer.
"""

from __future__ import annotations

import torch

from endless.attention import Kernel, Slots, additive
from endless.policies.spec import Policy, Sinks
from endless.rope import rotate_signed, rotation_matrix, signed_tables
from endless.transformer import Transformer

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
        self.slots = Slots(self.n_sinks, ring if ring is not None else DENSE_INITIAL)
        self.mask_fn = policy.mask()
        self.kernel = Kernel(self.n_sinks, zero_sink=model.zero_sink)
        d = model.dims
        shape = (d.n_layers, batch, d.n_kv_heads, self.slots.capacity, d.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.t = 0  # stream indices seen so far
        self._step: _Step | None = None
        self._sink_tables: tuple | None = None  # (n, cos, sin, matrix) of the steady-state sink query
        self._views: tuple | None = None  # (k, v, k per layer, v per layer), see layer_views

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    def _grow(self, needed: int) -> None:
        new = self.slots.ring
        while new < needed:
            new *= 2
        pad = self.slots.grow(new)
        self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:3], pad, self.k.shape[-1])], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:3], pad, self.v.shape[-1])], dim=3)

    def begin(self, n: int) -> None:
        """Prepare positions, slots, mask and RoPE tables for the next ``n`` tokens (all layers)."""
        if n > self.chunk and not self.growable:
            raise ValueError(f"chunk of {n} tokens exceeds the state's chunk size {self.chunk}")
        if self.growable and self.t + n > self.capacity:
            self._grow(self.t + n)
        pos = torch.arange(self.t, self.t + n)
        slots = self.slots.occupy(pos)
        bias = additive(self.slots.visible(pos, self.mask_fn))  # (C, N)
        dtype, scale, dev = self.model.dtype, self.model.scale, self.k.device
        # the bookkeeping (positions, slots, mask) is host-side integer work; what the layers
        # read goes to the KV buffers' device once per step, shared by every layer
        slots, bias = slots.to(dev), bias.to(dev)
        cos, sin = signed_tables(self.model.rope, pos)
        sink = None
        if isinstance(self.policy, Sinks) and self.n_sinks and int(pos[-1]) > self.policy.sinks + self.policy.window:
            sink = self._sink_query_tables(pos, scale)
        st = _Step(pos, slots, bias, min(self.t + n, self.capacity))
        if n == 1:
            # Decoding: each rotation is one (D, D) matrix product, the query's at t and (past
            # S+W) at S+W side by side in one (D, 2D) matrix -- 2 ops per layer instead of 15.
            # the key's rotation stays float32: a (KV, D) x (D, D) product in bfloat16 costs
            # ~20 us on this CPU, the same in float32 plus the casts ~4 us (x 30 layers per token)
            st.rk = rotation_matrix(cos[0], sin[0]).float()
            rq = rotation_matrix(cos[0], sin[0]) * scale
            # the query's too: a (H, D) x (D, 2D) product costs 13 us in bfloat16, 6 us in
            # float32 with the casts; and so both rotations round once, as the chunk path's
            st.rq = (rq if sink is None else torch.cat([rq, sink[2]], dim=1)).float()
            # 0 / -inf is exact in any dtype: in the keys' dtype the scores take it in place and a
            # bfloat16 softmax (float32 inside, rounded once) gives the mix its weights directly
            st.bias = bias.to(dtype)
        else:
            # float32 tables: rotations compute in float32 and round once to the model dtype, as
            # the one-token path's matrix products do (bfloat16 tables and products rounded each
            # step put chunked and token-by-token log-probs further apart)
            st.cos, st.sin, st.qcos, st.qsin = (t.float() for t in (cos, sin, cos * scale, sin * scale))
            # 0 / -inf, exact in any dtype; one copy per query group (rows (g, c) of the score
            # matrix), so the score product adds it in its own epilogue (baddbmm)
            g = self.model.dims.n_heads // self.model.dims.n_kv_heads
            st.bias = bias.to(dtype).expand(g, -1, -1).contiguous()
            st.sink = None if sink is None else tuple(t.float() for t in sink[:2])
        self._step = st

    def _sink_query_tables(self, pos: torch.Tensor, scale: float) -> tuple:
        """float64 query tables at the sinks' in-cache positions, scale folded in, and the
        (D, D) rotation matrix of the last one. Past S+W every query sits at S+W, so the tables
        of a steady-state step are computed once and reused."""
        spos = self.policy.sink_query_positions(pos)
        steady = int(pos[0]) >= self.policy.sinks + self.policy.window
        cached = self._sink_tables
        if steady and cached is not None and cached[0] == len(pos):
            return cached[1:]
        cos, sin = signed_tables(self.model.rope, spos)
        tables = (cos * scale, sin * scale, rotation_matrix(cos[-1], sin[-1]) * scale)
        if steady:
            self._sink_tables = (len(pos), *tables)
        return tables

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write the new keys (rotated once, at their stream index) and values into their slots,
        then attend (``endless.attention.Kernel``)."""
        st = self._step
        kbuf, vbuf = self.k[layer], self.v[layer]  # (B, KV, N, D)
        if st.rk is not None:
            return attend_one(self.kernel, kbuf, vbuf, st.slots, st.rk, st.rq, st.bias, q, k, v)
        kbuf.index_copy_(2, st.slots, rotate_signed(k, st.cos, st.sin))
        vbuf.index_copy_(2, st.slots, v)
        # Slots fill in stream order until the ring wraps: only the first ``occupied`` can be
        # visible, so a young stream scores (and soft-maxes) only the keys it has.
        occ = st.occupied
        qr = rotate_signed(q, st.qcos, st.qsin)  # (B, H, C, D), scaled
        qs = None if st.sink is None else rotate_signed(q, *st.sink)
        return self.kernel.chunk(qr, kbuf[:, :, :occ], vbuf[:, :, :occ], st.bias[..., :occ], qs)

    def layer_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The keys and values of each layer as separate views (what the compiled step,
        ``endless.step``, writes: a graph that wrote one stacked tensor through views would copy
        all of it every token), made again whenever the buffers were replaced."""
        if self._views is None or self._views[0] is not self.k or self._views[1] is not self.v:
            self._views = (self.k, self.v, list(self.k.unbind(0)), list(self.v.unbind(0)))
        return self._views[2], self._views[3]

    @property
    def prepared(self) -> "_Step | None":
        """What ``begin`` prepared for the current step (None between steps): positions, slots,
        bias and, for one token, the rotation matrices ``rk``/``rq`` -- what a batched kernel
        over several states (``endless.serve.pool``) reads instead of calling ``attend``."""
        return self._step

    def end(self) -> None:
        self.t += int(self._step.pos.numel())
        self._step = None

    def rehome(self, k: torch.Tensor, v: torch.Tensor, *, copy: bool = True) -> None:
        """Keep the keys/values in ``k``, ``v`` (same shape; e.g. a row of
        ``endless.serve.pool.KVPool``) from now on, copying the current ones there unless
        ``copy`` is False (the caller already did). Nothing else changes: slots, positions and
        every later result stay exactly as they were."""
        if tuple(k.shape) != tuple(self.k.shape) or tuple(v.shape) != tuple(self.v.shape):
            raise ValueError(f"cannot rehome keys of shape {tuple(self.k.shape)} into {tuple(k.shape)}")
        if copy:
            k.copy_(self.k)
            v.copy_(self.v)
        self.k, self.v = k, v

    def forward(self, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Feed ids (B, C) with C <= chunk; returns logits (B, C or 1, V). A decoded token goes
        through the model's compiled step when it has one that serves this state (``endless.step``)."""
        step = getattr(self.model, "step", None)
        if step is not None and ids.shape[1] == 1 and step.serves(self):
            return step(self, ids)
        return self.model.forward(ids, self, last_only=last_only)

    # -- save / restore ---------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "slot_pos": self.slots.pos}

    def load_tensors(self, tensors: dict[str, torch.Tensor], t: int) -> None:
        """Take saved (or snapshotted) tensors from any device onto this state's."""
        if self.growable:
            self.slots.ring = tensors["k"].shape[3] - self.n_sinks
            self.k = tensors["k"].to(self.k.device, copy=True)
            self.v = tensors["v"].to(self.v.device, copy=True)
            self.slots.pos = tensors["slot_pos"].to("cpu", copy=True)
        else:
            for name, buf in self.state_tensors().items():
                if tuple(tensors[name].shape) != tuple(buf.shape):
                    raise ValueError(f"{name}: shape {tuple(tensors[name].shape)} != {tuple(buf.shape)}")
                buf.copy_(tensors[name])
        self.t = t


def attend_one(kernel: Kernel, kbuf: torch.Tensor, vbuf: torch.Tensor, slots: torch.Tensor, rk: torch.Tensor,
               rq: torch.Tensor, bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One layer of a decoded token: the key rotated once at its stream index (``rk``, (D, D)) and
    written with its value into ``slots`` of ``kbuf``/``vbuf`` (B, KV, N, D), the query rotated and
    scaled (``rq``: (D, D), or (D, 2D) with the sinks' query at S+W beside it), then
    ``Kernel.one``. ``q`` (B, H, 1, D), ``k``/``v`` (B, KV, 1, D); returns (B, H, 1, D). What
    ``RingKV.attend`` runs for one token and what the compiled step (``endless.step``) traces."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    kbuf.index_copy_(2, slots, torch.mm(k.reshape(-1, d).float(), rk).to(kbuf.dtype).view(b, kv, 1, d))
    vbuf.index_copy_(2, slots, v)
    qq = torch.mm(q.reshape(-1, d).float(), rq).to(q.dtype)  # (B*H, D or 2D): rows (b, kv, g)
    return kernel.one(qq, kbuf, vbuf, bias, (b, h, kv, d))


class _Step:
    """What ``begin`` prepares for all layers: positions, slots, additive mask (0 / -inf; (1, N)
    in the model dtype for one token, (G, C, N) in the model dtype for chunks), how many slots are filled, and either (chunks) key
    tables (cos, signed sin), query tables with the attention scale folded in and sink tables, or
    (one token) the key and query rotation matrices."""

    __slots__ = ("pos", "slots", "bias", "occupied", "cos", "sin", "qcos", "qsin", "sink", "rk", "rq")

    def __init__(self, pos, slots, bias, occupied: int):
        self.pos, self.slots, self.bias, self.occupied = pos, slots, bias, occupied
        self.cos = self.sin = self.qcos = self.qsin = self.sink = self.rk = self.rq = None


__all__ = ["RingKV", "attend_one"]
