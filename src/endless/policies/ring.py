"""One ring-buffer KV state for dense, window, sinks and BSWA (docs/methods.md sections 1-2).

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
the temporaries are O(chunk x (S+R)). A chunk's score matrix (MBs) lives in a buffer reused by
every layer and step: fresh, it would be mapped and page-faulted anew each time, which cost more
than its arithmetic (with the same fix for the log-probabilities in ``endless.stream``, bfloat16
chunked perplexity went from 687 to 799-905 tokens/s on one core).

Per-token cost (issue 5): everything that depends only on the step -- the additive mask, the
RoPE tables with the attention scale folded into the query's, the sinks' tables (constant once
the stream is past S+W, so cached) -- is built once in ``begin`` and shared by all layers;
``attend`` is then a dozen tensor ops per layer.
"""

from __future__ import annotations

import torch

from endless.config import Policy, Sinks
from endless.device import fused_attention
from endless.model import Transformer, gqa_mix, gqa_scores, sdpa_attention

SCORE_BLOCK = 1 << 22  # elements of one block of attention scores (16 MB in float32)

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
        self._sink_tables: tuple | None = None  # (n, cos, sin, matrix) of the steady-state sink query
        self._buffers: dict[str, torch.Tensor] = {}  # chunk attention's reused score buffers

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
        visible = (kpos[None, :] >= 0) & self.mask_fn(pos[:, None], kpos[None, :])  # (C, N)
        bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
        dtype, scale, dev = self.model.dtype, self.model.scale, self.k.device
        # the bookkeeping (positions, slots, mask) is host-side integer work; what the layers
        # read goes to the KV buffers' device once per step, shared by every layer
        slots, bias = slots.to(dev), bias.to(dev)
        cos, sin = _signed_tables(self.model.rope, pos)
        sink = None
        if isinstance(self.policy, Sinks) and self.n_sinks and int(pos[-1]) > self.policy.sinks + self.policy.window:
            sink = self._sink_query_tables(pos, scale)
        st = _Step(pos, slots, bias, min(self.t + n, self.capacity))
        if n == 1:
            # Decoding: each rotation is one (D, D) matrix product, the query's at t and (past
            # S+W) at S+W side by side in one (D, 2D) matrix -- 2 ops per layer instead of 15.
            # the key's rotation stays float32: a (KV, D) x (D, D) product in bfloat16 costs
            # ~20 us on this CPU, the same in float32 plus the casts ~4 us (x 30 layers per token)
            st.rk = _rotation_matrix(cos[0], sin[0]).float()
            rq = _rotation_matrix(cos[0], sin[0]) * scale
            # the query's too: a (H, D) x (D, 2D) product costs 13 us in bfloat16, 6 us in
            # float32 with the casts; and so both rotations round once, as the chunk path's
            st.rq = (rq if sink is None else torch.cat([rq, sink[2]], dim=1)).float()
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
        cos, sin = _signed_tables(self.model.rope, spos)
        tables = (cos * scale, sin * scale, _rotation_matrix(cos[-1], sin[-1]) * scale)
        if steady:
            self._sink_tables = (len(pos), *tables)
        return tables

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self._step
        kbuf, vbuf = self.k[layer], self.v[layer]  # (B, KV, N, D)
        if st.rk is not None:
            return self._attend_one(st, kbuf, vbuf, q, k, v)
        kbuf.index_copy_(2, st.slots, _rotate(k, st.cos, st.sin))
        vbuf.index_copy_(2, st.slots, v)
        # Slots fill in stream order until the ring wraps: only the first ``occupied`` can be
        # visible, so a young stream scores (and soft-maxes) only the keys it has.
        keys, values, bias = kbuf[:, :, : st.occupied], vbuf[:, :, : st.occupied], st.bias[..., : st.occupied]
        qr = _rotate(q, st.qcos, st.qsin)  # (B, H, C, D), scaled
        qs = None if st.sink is None else _rotate(q, *st.sink)
        b, h, c, _ = q.shape
        # Queries in row blocks so a block's scores stay under SCORE_BLOCK elements: a long
        # dense cache would otherwise need (B, H, C, N) float32 score buffers of hundreds of MB.
        # Rows are independent: same numbers.
        rows = max(1, min(c, SCORE_BLOCK // max(1, b * h * st.occupied)))
        if rows == c:
            return self._attention(qr, qs, keys, values, bias)
        out = torch.empty_like(qr)
        for lo in range(0, c, rows):
            hi = min(c, lo + rows)
            out[:, :, lo:hi] = self._attention(qr[:, :, lo:hi], None if qs is None else qs[:, :, lo:hi], keys, values,
                                               bias[:, lo:hi])
        return out

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer of ``shape``: the score and probability matrices of a chunk are MBs,
        and a fresh allocation of that size is mapped and page-faulted anew on every layer
        (measured: 4x the attention's arithmetic in bfloat16). Grows only with the dense cache."""
        n = 1
        for size in shape:
            n *= size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=self.k.device)
        return buf[:n].view(shape)

    def _attention(self, qr, qs, keys, values, bias) -> torch.Tensor:
        """Softmax attention (B, H, C, D) of rotated queries ``qr`` over ``keys``/``values``
        (B, KV, N, D) with the additive ``bias`` (G, C, N); with sinks past S+W the sink columns are
        scored by ``qs`` (queries at S+W). Scores and probabilities live in reused buffers; the
        softmax runs in float32 and, as the one-token path, hands the values the KV dtype."""
        b, h, c, d = qr.shape
        kv, n = keys.shape[1], keys.shape[2]
        g = h // kv
        if torch.is_grad_enabled() and (qr.requires_grad or keys.requires_grad or values.requires_grad):
            return _plain_attention(qr, qs, keys, values, bias, self.n_sinks)
        if qs is None and fused_attention(keys.device):
            return sdpa_attention(qr, keys, values, bias[0])
        scores = self._scratch("scores", (b * kv, g * c, n), keys.dtype)
        # rows (g, c); the (G*C, N) bias broadcasts over batch and KV heads and is added by the
        # product itself (bfloat16: 1.27x faster than bmm then add_, same numbers: adding 0 / -inf
        # to the float32 accumulator before its one rounding is exact)
        bias = bias.reshape(g * c, n)
        q3, k3, v3 = qr.reshape(b * kv, g * c, d), keys.reshape(b * kv, n, d), values.reshape(b * kv, n, d)
        # float32 products split a batch over threads (3 KV heads on 2 threads: one idles a third
        # of the time); one product per head splits its rows instead: 1.27-1.30x on the products,
        # 727 -> 784 tok/s on SmolLM2 float32 chunks with 2 threads. bfloat16's oneDNN products are
        # faster batched (252 against 292 us).
        per_head = (keys.dtype == torch.float32 and keys.device.type == "cpu"
                    and (b * kv) % torch.get_num_threads() != 0)
        if per_head:
            for i in range(b * kv):
                torch.addmm(bias, q3[i], k3[i].t(), out=scores[i])
        else:
            torch.baddbmm(bias, q3, k3.transpose(1, 2), out=scores)
        if qs is not None:  # sinks sit at in-cache positions 0..S-1 and the query at min(t, S+W)
            s = self.n_sinks
            scores[:, :, :s] = torch.baddbmm(bias[:, :s], qs.reshape(b * kv, g * c, d),
                                             keys[:, :, :s].reshape(b * kv, s, d).transpose(1, 2))
        # softmax of bfloat16 computes in float32 and rounds once
        torch.softmax(scores, dim=-1, out=scores)  # in place: each row is read before it is written
        if per_head:
            out = scores.new_empty(b * kv, g * c, d)
            for i in range(b * kv):
                torch.mm(scores[i], v3[i], out=out[i])
        else:
            out = torch.bmm(scores, v3)  # (B*KV, G*C, D)
        return out.view(b, h, c, d)

    def _attend_one(self, st: "_Step", kbuf, vbuf, q, k, v) -> torch.Tensor:
        """``attend`` for a single new token, in as few tensor ops as possible (it runs for every
        layer of every decoded token). Same scores as the general path: with sinks past S+W each
        query row is scored twice in one bmm (rotated at t, and at S+W) and the sink columns
        take the second score."""
        b, h, _, d = q.shape
        kv, n = k.shape[1], kbuf.shape[2]
        g = h // kv
        kbuf.index_copy_(2, st.slots, torch.mm(k.reshape(-1, d).float(), st.rk).to(kbuf.dtype).view(b, kv, 1, d))
        vbuf.index_copy_(2, st.slots, v)
        qq = torch.mm(q.reshape(-1, d).float(), st.rq).to(q.dtype)  # (B*H, D or 2D): rows (b, kv, g)
        keys = kbuf.view(b * kv, n, d)
        if qq.shape[1] == d:
            scores = torch.bmm(qq.view(b * kv, g, d), keys.transpose(1, 2))  # (B*KV, G, N)
            if scores.dtype == torch.float32:
                scores.add_(st.bias)
            else:
                scores = scores + st.bias
        else:
            # sinks past S+W: each row is [query at t | query at S+W], so viewed as (B*KV, 2G, D)
            # the rows alternate and one product scores both (one op less per layer than two
            # products: the keys are read once); the S sink columns take the second rows' scores
            s = self.n_sinks
            both = torch.bmm(qq.view(b * kv, 2 * g, d), keys.transpose(1, 2))
            both[:, 0::2, :s] = both[:, 1::2, :s]
            scores = both[:, 0::2] + st.bias
        p = torch.softmax(scores, dim=-1)
        if p.dtype != vbuf.dtype:
            p = p.to(vbuf.dtype)
        return torch.bmm(p, vbuf.view(b * kv, n, d)).view(b, h, 1, d)

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
        """Take saved (or snapshotted) tensors from any device onto this state's."""
        if self.growable:
            self.ring = tensors["k"].shape[3] - self.n_sinks
            self.k = tensors["k"].to(self.k.device, copy=True)
            self.v = tensors["v"].to(self.v.device, copy=True)
            self.slot_pos = tensors["slot_pos"].to("cpu", copy=True)
        else:
            for name, buf in self.state_tensors().items():
                if tuple(tensors[name].shape) != tuple(buf.shape):
                    raise ValueError(f"{name}: shape {tuple(tensors[name].shape)} != {tuple(buf.shape)}")
                buf.copy_(tensors[name])
        self.t = t


class _Step:
    """What ``begin`` prepares for all layers: positions, slots, additive mask (0 / -inf; (1, N)
    float32 for one token, (G, C, N) in the model dtype for chunks), how many slots are filled, and either (chunks) key
    tables (cos, signed sin), query tables with the attention scale folded in and sink tables, or
    (one token) the key and query rotation matrices."""

    __slots__ = ("pos", "slots", "bias", "occupied", "cos", "sin", "qcos", "qsin", "sink", "rk", "rq")

    def __init__(self, pos, slots, bias, occupied: int):
        self.pos, self.slots, self.bias, self.occupied = pos, slots, bias, occupied
        self.cos = self.sin = self.qcos = self.qsin = self.sink = self.rk = self.rq = None


def _plain_attention(qr, qs, keys, values, bias, n_sinks: int) -> torch.Tensor:
    """``RingKV._attention`` with fresh tensors, for autograd (``out=`` buffers cannot carry a
    graph): the same products, softmax in float32, probabilities rounded once to the KV dtype."""
    scores = gqa_scores(qr, keys)  # (B, KV, G, C, N)
    if qs is not None:
        scores[..., :n_sinks] = gqa_scores(qs, keys[:, :, :n_sinks])
    probs = torch.softmax(scores.float() + bias, dim=-1).to(values.dtype)
    return gqa_mix(probs, values)


def _rotation_matrix(cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE at one position as a (D, D) matrix M with ``rotate(x) == x @ M`` (rotate_half layout):
    M[i, i] = cos_i and M[(i + D/2) % D, i] = signed_sin_i. The zeros add exactly nothing."""
    d = cos.numel()
    m = torch.diag(cos)
    i = torch.arange(d, device=cos.device)
    m[(i + d // 2) % d, i] = signed_sin
    return m


def _signed_tables(rope, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos and sin (C, D) with the first half of sin negated, for ``_rotate``; the
    caller folds in the query scale before the one cast to the compute dtype."""
    cos, sin = rope.tables(positions, torch.float64)
    half = sin.shape[-1] // 2
    sin[:, :half].neg_()
    return cos, sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``endless.rope.rotate`` in three ops: rotate_half(x) = roll(x, D/2) * [-1.., +1..], and the
    sign is in ``signed_sin`` already (negation is exact, so the values are the same). Computed
    in the tables' dtype (float32) and rounded once to ``x``'s."""
    xf = x.to(cos.dtype)
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, -1), signed_sin).to(x.dtype)


__all__ = ["RingKV"]
