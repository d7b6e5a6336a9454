"""Attention over a cache of slots: the one implementation every path uses.

Every streaming policy (``endless.policies.ring.RingKV``), the streaming FAM
(``endless.fam.state.FamState``), the transformers adapter (``endless.hf``) and the parallel FAM
schedule (``endless.fam.parallel``) attend through this module (docs/methods.md section 4):

- ``Slots``: where a stream index lives in a fixed buffer. ``sinks`` slots hold the first tokens
  forever, then a ring: index j >= S lives in slot ``S + (j - S) % ring``; ``extra`` trailing
  slots (the FAM's rows) are visible to every query. ``slot_pos`` records the stream index held
  in each slot (-1: empty) on the host, and visibility is the policy's mask function from
  ``endless.masks`` applied to (query index, ``slot_pos``): one definition serves the runtime and
  the dense oracles.
- ``Kernel``: softmax attention of rotated, scaled queries over a slot buffer under an additive
  0 / -inf bias, with the sink columns optionally scored by a second query (StreamingLLM: the
  query at its in-cache position ``min(t, S+W)``, "Efficient Streaming Language Models with
  Attention Sinks", section 3.2). ``chunk`` serves C queries (row blocks keep a long dense
  cache's scores under ``SCORE_BLOCK`` elements; reused score buffers; PyTorch's fused kernel on
  CUDA; fresh tensors under autograd), ``one`` serves a decoded token in a dozen ops, for one
  stream or for the rows of ``endless.serve.pool``'s batched step. With
  ``zero_sink`` every softmax is off by one (``off_by_one_softmax``): the "zero sink" of the same
  paper, section 3.3, for models trained with it (``endless.zero_sink``; config key
  ``endless_zero_sink``).
- ``softmax_attention`` (plain, differentiable, optional null slot) and ``window_attention``
  (each block of queries over its own window of keys, the layer-major FAM form).

Shapes: queries (B, H, C, D), keys and values (B, KV, N, D) with H a multiple of KV (grouped
query attention: head h reads KV head h // G, G = H / KV, never materialised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from endless.device import fused_attention
from endless.masks import MaskFn

SCORE_BLOCK = 1 << 22  # elements of one block of attention scores (16 MB in float32)


# -- grouped-query products -------------------------------------------------------------------

def gqa_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scores of q (B, H, C, D) against k (B, KV, N, D) without repeating k: (B, KV, G, C, N)."""
    b, h, c, d = q.shape
    kv, n = k.shape[1], k.shape[2]
    g = h // kv
    # bmm on (B*KV) batches directly: torch.matmul on 4-D operands adds ~8 dispatcher calls
    # (expand, reshape, ...) per use, which is a measurable share of a decode step.
    s = torch.bmm(q.reshape(b * kv, g * c, d), k.reshape(b * kv, n, d).transpose(1, 2))  # (B*KV, G*C, N)
    return s.view(b, kv, g, c, n)


def gqa_mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Weights p (B, KV, G, C, N) times v (B, KV, N, D) -> (B, H, C, D)."""
    b, kv, g, c, n = p.shape
    out = torch.bmm(p.reshape(b * kv, g * c, n), v.reshape(b * kv, n, v.shape[-1]))  # (B*KV, G*C, D)
    return out.view(b, kv * g, c, v.shape[-1])


def off_by_one_softmax(s: torch.Tensor) -> torch.Tensor:
    """``exp(s_j) / (1 + sum exp(s))`` along the last dimension in float32 (SoftMax-off-by-One, the
    "zero sink" of "Efficient Streaming Language Models with Attention Sinks", section 3.3): a
    softmax over one more score of 0 whose weight is dropped. Shifted by max(max s, 0) so that
    neither term overflows; -inf scores get weight 0."""
    s = s.float()
    m = s.amax(dim=-1, keepdim=True).clamp(min=0.0)
    e = (s - m).exp()
    return e / (e.sum(dim=-1, keepdim=True) + (-m).exp())


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *,
                   zero_sink: bool = False) -> torch.Tensor:
    """PyTorch's fused attention for scaled, rotated q (B, H, C, D) over k, v (B, KV, N, D) with an
    additive 0 / -inf ``bias`` broadcastable to (B, H, C, N): what the CUDA paths use (the CPU
    paths keep their own products, tuned for the CPU). Same maths as ``gqa_scores`` + softmax +
    ``gqa_mix``; the kernel's softmax accumulates in float32. ``zero_sink``: one more key and value
    of zeros visible to every query (its score is exactly 0: softmax-off-by-one)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:  # repeat_interleave: head h reads KV head h // G, as gqa_scores groups them
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if zero_sink:
        k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[-1])], dim=2)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[-1])], dim=2)
        bias = F.pad(bias, (0, 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, *,
                      null_slot: bool = False, probs: list | None = None) -> torch.Tensor:
    """Plain differentiable attention of scaled, rotated q over k, v: scores in the inputs' dtype,
    ``bias`` (additive, broadcastable to (B, KV, G, C, N)) and softmax in float32, weights
    rounded once to the values' dtype. ``null_slot``: one more key of score 0 and value 0, so
    the weights on the real keys may sum to less than one (the "zero sink" of "Efficient
    Streaming Language Models with Attention Sinks", section 3.3). ``probs``: the float32
    weights (B, KV, G, C, N) are appended to it (attention maps)."""
    s = gqa_scores(q, k).float()
    if bias is not None:
        s = s + bias
    if null_slot:
        p = off_by_one_softmax(s)
    else:
        p = torch.softmax(s, dim=-1)
    if probs is not None:
        probs.append(p)
    return gqa_mix(p.to(v.dtype), v)


def additive(visible: torch.Tensor) -> torch.Tensor:
    """A boolean visibility mask as a float32 bias: 0 where visible, -inf elsewhere."""
    return torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill_(~visible, float("-inf"))


# -- the slot layout --------------------------------------------------------------------------

class Slots:
    """Which stream index each slot of a buffer holds: ``sinks`` fixed slots, a ring of ``ring``
    slots, then ``extra`` slots visible to every query. Host-side integer bookkeeping."""

    def __init__(self, sinks: int, ring: int, extra: int = 0) -> None:
        self.sinks, self.ring, self.extra = sinks, ring, extra
        self.pos = torch.full((sinks + ring,), -1, dtype=torch.long)  # stream index per slot (-1: empty)

    @property
    def capacity(self) -> int:
        """Slots that hold stream tokens (the ``extra`` ones not counted)."""
        return self.sinks + self.ring

    def of(self, positions: torch.Tensor) -> torch.Tensor:
        """The slot of each stream index."""
        s = self.sinks
        return torch.where(positions < s, positions, s + (positions - s) % self.ring)

    def occupy(self, positions: torch.Tensor) -> torch.Tensor:
        """Record that ``positions`` are written now; returns their slots."""
        slots = self.of(positions)
        self.pos[slots] = positions
        return slots

    def visible(self, positions: torch.Tensor, mask_fn: MaskFn) -> torch.Tensor:
        """(C, capacity + extra) bool: what each query at ``positions`` may attend to."""
        kpos = self.pos[None, :]
        seen = (kpos >= 0) & mask_fn(positions[:, None], kpos)
        if not self.extra:
            return seen
        return torch.cat([seen, torch.ones(len(positions), self.extra, dtype=torch.bool)], dim=1)

    def grow(self, ring: int) -> int:
        """Widen the ring to ``ring`` slots (the dense reference's cache); returns the slots added.
        Only valid before the ring first wraps (the slot of every index is then unchanged)."""
        pad = ring - self.ring
        self.pos = torch.cat([self.pos, self.pos.new_full((pad,), -1)])
        self.ring = ring
        return pad


# -- the kernel -------------------------------------------------------------------------------

class Kernel:
    """Softmax attention over a slot buffer, with score buffers reused across layers and steps.

    A chunk's score and probability matrices are MBs, and a fresh allocation of that size is
    mapped and page-faulted anew on every layer (measured: 4x the attention's arithmetic in
    bfloat16), so they live in ``_buffers`` and grow only with a dense cache."""

    def __init__(self, n_sinks: int = 0, *, zero_sink: bool = False) -> None:
        self.n_sinks = n_sinks
        self.zero_sink = zero_sink  # softmax-off-by-one everywhere (a model trained with a zero sink)
        self._buffers: dict[str, torch.Tensor] = {}

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def chunk(self, qr: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
              qs: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, C, D) attention of rotated, scaled ``qr`` over ``keys``/``values`` (B, KV, N, D)
        with the additive ``bias`` (G, C, N) (0 / -inf, exact in any dtype); the first
        ``n_sinks`` columns are scored by ``qs`` instead when it is given. Queries go in row
        blocks so a block's scores stay under ``SCORE_BLOCK`` elements: rows are independent,
        so the numbers are the same."""
        b, h, c, _ = qr.shape
        n = keys.shape[2]
        rows = max(1, min(c, SCORE_BLOCK // max(1, b * h * n)))
        if rows == c:
            return self._block(qr, qs, keys, values, bias)
        out = torch.empty_like(qr)
        for lo in range(0, c, rows):
            hi = min(c, lo + rows)
            out[:, :, lo:hi] = self._block(qr[:, :, lo:hi], None if qs is None else qs[:, :, lo:hi], keys, values,
                                           bias[:, lo:hi])
        return out

    def _block(self, qr, qs, keys, values, bias) -> torch.Tensor:
        """``chunk`` for one row block. The softmax runs in float32 and, as the one-token path,
        hands the values the KV dtype."""
        b, h, c, d = qr.shape
        kv, n = keys.shape[1], keys.shape[2]
        g = h // kv
        if torch.is_grad_enabled() and (qr.requires_grad or keys.requires_grad or values.requires_grad):
            return self._plain(qr, qs, keys, values, bias)  # ``out=`` buffers cannot carry a graph
        if qs is None and fused_attention(keys.device):
            return sdpa_attention(qr, keys, values, bias[0], zero_sink=self.zero_sink)
        scores = self._scratch("scores", (b * kv, g * c, n), keys.dtype, keys.device)
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
        if qs is not None:  # the sink columns, scored by the query at its in-cache position
            s = self.n_sinks
            scores[:, :, :s] = torch.baddbmm(bias[:, :s], qs.reshape(b * kv, g * c, d),
                                             keys[:, :, :s].reshape(b * kv, s, d).transpose(1, 2))
        # softmax of bfloat16 computes in float32 and rounds once
        if self.zero_sink:  # float32 off-by-one, rounded once into the buffer's dtype
            scores.copy_(off_by_one_softmax(scores))
        else:
            torch.softmax(scores, dim=-1, out=scores)  # in place: each row is read before it is written
        if per_head:
            out = scores.new_empty(b * kv, g * c, d)
            for i in range(b * kv):
                torch.mm(scores[i], v3[i], out=out[i])
        else:
            out = torch.bmm(scores, v3)  # (B*KV, G*C, D)
        return out.view(b, h, c, d)

    def _plain(self, qr, qs, keys, values, bias) -> torch.Tensor:
        """``_block`` with fresh tensors, for autograd: the same products, softmax in float32,
        probabilities rounded once to the KV dtype."""
        scores = gqa_scores(qr, keys)  # (B, KV, G, C, N)
        if qs is not None:
            scores[..., : self.n_sinks] = gqa_scores(qs, keys[:, :, : self.n_sinks])
        s = scores.float() + bias
        probs = (off_by_one_softmax(s) if self.zero_sink else torch.softmax(s, dim=-1)).to(values.dtype)
        return gqa_mix(probs, values)

    def one(self, qq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
            shape: tuple[int, int, int, int], *, sink_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One query per stream, in as few tensor ops as possible (it runs for every layer of every
        decoded token). ``qq`` (B*H, D) holds the rotated, scaled queries, rows (b, kv, g); or
        (B*H, 2D) with each row [query at t | query at S+W] when the sink columns are scored
        apart. ``keys``/``values`` (B, KV, N, D); ``bias`` 0 / -inf, either (1, N) shared by
        the B streams (float32, or the keys' dtype: then added in place) or (B, 1, 1, N), one row
        per stream; ``shape`` (B, H, KV, D). The sink columns are the first ``n_sinks``, or
        where ``sink_mask`` (B, 1, 1, N) is True (streams with different sinks in one call, as
        ``endless.serve.pool`` batches them). Returns (B, H, 1, D)."""
        b, h, kv, d = shape
        n = keys.shape[2]
        g = h // kv
        kflat = keys.view(b * kv, n, d)
        if qq.shape[1] == d:
            scores = torch.bmm(qq.view(b * kv, g, d), kflat.transpose(1, 2))  # (B*KV, G, N)
        else:
            # viewed as (B*KV, 2G, D) the rows alternate and one product scores both (one op less
            # per layer than two products: the keys are read once); the sink columns take the
            # second rows' scores
            both = torch.bmm(qq.view(b * kv, 2 * g, d), kflat.transpose(1, 2))
            if sink_mask is None:
                s = self.n_sinks
                both[:, 0::2, :s] = both[:, 1::2, :s]
                scores = both[:, 0::2]
            else:
                both = both.view(b, kv, 2 * g, n)
                scores = torch.where(sink_mask, both[:, :, 1::2], both[:, :, 0::2])  # (B, KV, G, N)
        if bias.dim() > 2:
            scores = scores.view(b, kv, g, n) + bias
        elif scores.dtype == bias.dtype and scores.is_contiguous():
            scores.add_(bias)
        else:
            scores = scores + bias
        # a bfloat16 softmax computes in float32 and rounds once: the same weights as a float32
        # softmax then a cast, in one op instead of three (bias in the scores' dtype, see RingKV)
        p = off_by_one_softmax(scores) if self.zero_sink else torch.softmax(scores, dim=-1)
        if p.dtype != values.dtype:
            p = p.to(values.dtype)
        return torch.bmm(p.view(b * kv, g, n), values.view(b * kv, n, d)).view(b, h, 1, d)


# -- the layer-major (parallel) FAM form -------------------------------------------------------

def window_attention(q: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, visible: torch.Tensor, *,
                     fused: bool) -> torch.Tensor:
    """Scaled, rotated q (B, H, nb*Bl, D): block n's Bl queries over its own window kw, vw
    (B, KV, nb, S, D) where ``visible`` (nb, Bl, S) allows; returns (B, H, nb*Bl, D). ``fused``:
    PyTorch's fused kernel (flash on the CPU, which takes a mask only as 4-D: (1, nb, G*Bl, S) here);
    otherwise einsum products with a float32 softmax."""
    bsz, h, n, d = q.shape
    n_kv = kw.shape[1]
    nb, bl, s = visible.shape
    g = h // n_kv
    qb = q.reshape(bsz, n_kv, g, nb, bl, d)
    if not fused:
        scores = torch.einsum("bkgnqd,bknsd->bkgnqs", qb, kw).float()
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(vw.dtype)
        return torch.einsum("bkgnqs,bknsd->bkgnqd", p, vw).reshape(bsz, h, n, d)
    # blocks as heads, the G query heads of a KV head stacked as rows: (B*KV, nb, G*Bl, D)
    qf = qb.permute(0, 1, 3, 2, 4, 5).reshape(bsz * n_kv, nb, g * bl, d)
    kf, vf = kw.reshape(bsz * n_kv, nb, s, d), vw.reshape(bsz * n_kv, nb, s, d)
    mf = visible[:, None].expand(nb, g, bl, s).reshape(1, nb, g * bl, s)
    o = F.scaled_dot_product_attention(qf, kf.to(qf.dtype), vf.to(qf.dtype), attn_mask=mf, scale=1.0)
    return o.reshape(bsz, n_kv, nb, g, bl, d).permute(0, 1, 3, 2, 4, 5).reshape(bsz, h, n, d)


__all__ = ["SCORE_BLOCK", "Kernel", "Slots", "additive", "gqa_mix", "gqa_scores", "off_by_one_softmax", "sdpa_attention",
           "softmax_attention", "window_attention"]
