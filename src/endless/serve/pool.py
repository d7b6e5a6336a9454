"""The rings of a decoding batch as rows of one tensor, so one attention call serves them all.

Why: in a batched decoding step (``endless.serve.batch``) the weight products run once for all
K streams, but attention ran once per stream -- 15 small tensor ops per layer per stream (key and
query rotations, two slot writes, two products, bias, softmax, casts). At 16 streams that is
7,200 dispatched ops a step, and a bfloat16 product over one stream's ring costs 2-3x its bytes
in fixed overhead on the CPUs measured (issue 22: 2.72x the tokens/s of one session where 3x was
the goal). With the streams' key/value buffers laid out as rows of one pair of tensors, each layer
is a dozen ops whatever K: two batched rotations, one scattered write each for keys and values,
one product for the scores, one for the mix.

Contract:

- ``KVPool(model, rows, N)`` owns ``k, v`` of shape (L, rows, KV, N, D), allocated on first
  use; ``RingKV`` states of ring size N (any policy
  of the ring family: sinks with any S, window, BSWA) can live in a row. ``place(states)`` moves
  each into a row (``RingKV.rehome``: their keys/values are copied once, then written in place),
  evicting to a private copy a state that is not in this batch if its row is needed. A state
  stays in its row across steps and requests; rows of states that were dropped are reused.
- ``attend(layer, q, k, v)`` after every placed state's ``begin(1)``: the rotations and slot
  writes batched, then ``endless.attention.Kernel.one`` over the rows (the attention every path
  shares, each row with its own bias and sink columns): the same numbers as each state's own ``attend`` (same float32 rotations rounded once, same bias, the sink columns scored
  by the query at S+W, softmax in float32, the values' dtype for the mix), up to the summation
  order of the products (tests/test_serve_pool.py: log-probs within 1e-5 in float32).
- ``PoolSet`` keeps one pool per ring size (up to four), so a batch of several sizes attends
  in one call per size.
- The K placed states of a step occupy rows 0..K-1 (a state moves only when the batch changes:
  one copy of its keys/values), so the products read exactly the batch's rings.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from endless.attention import Kernel
from endless.policies.ring import RingKV


def poolable(state, model) -> bool:
    """Whether ``state`` can live in a pool over ``model``: a one-stream ring of fixed size."""
    return type(state) is RingKV and state.batch == 1 and not state.growable and state.model is model


class KVPool:
    """Key/value rows shared by the ring states of one ring size (``capacity`` slots) of a
    decoding batch (see the module docstring)."""

    def __init__(self, model, rows: int, capacity: int) -> None:
        if rows < 1:
            raise ValueError(f"a pool needs at least one row, got {rows}")
        self.model = model
        self.rows = rows
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self._owners: list[weakref.ref | None] = [None] * rows
        self._row: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # state -> row
        self._plan: _Plan | None = None
        self.kernel = Kernel(zero_sink=model.zero_sink)  # the attention every path shares (sinks by mask here)

    # -- placement ----------------------------------------------------------------------------

    def fits(self, state) -> bool:
        """Whether ``state`` can live in this pool: ``poolable`` and of this pool's ring size."""
        return poolable(state, self.model) and state.capacity == self.capacity

    def row_of(self, state) -> int | None:
        return self._row.get(state)

    def _allocate(self, state: RingKV) -> None:
        shape = list(state.k.shape)  # (L, 1, KV, N, D)
        shape[1] = self.rows
        # ordinary tensors (streams also write them outside inference mode), left unwritten: a
        # row is filled when a state moves in, so rows never used cost no memory pages
        with torch.inference_mode(False):
            self.k = state.k.new_empty(shape)
            self.v = state.v.new_empty(shape)

    def _holder(self, row: int) -> RingKV | None:
        """The live state whose keys are in ``row``, if any."""
        ref = self._owners[row]
        owner = None if ref is None else ref()
        return owner if owner is not None and self._row.get(owner) == row else None

    def _evict(self, row: int) -> None:
        owner = self._holder(row)
        if owner is not None:
            with torch.inference_mode(False):
                owner.rehome(owner.k.clone(), owner.v.clone(), copy=False)
            del self._row[owner]
        self._owners[row] = None

    def place(self, states: Sequence) -> list[bool]:
        """Put the states that fit (at most ``rows`` of them, in order) in rows 0..K-1; returns
        which states are placed. A state already in one of those rows stays; one elsewhere (in a
        higher row or in its own buffers) moves into a row no member holds, evicting whatever
        state held it. So the step's products span exactly K rows."""
        placed = [False] * len(states)
        want = [i for i, s in enumerate(states) if self.fits(s)]
        if not want:
            return placed
        if self.k is None:
            self._allocate(states[want[0]])
        want = want[: self.rows]
        n = len(want)
        inside = {self._row.get(states[i]) for i in want}
        holes = [r for r in range(n) if r not in inside]
        for i in want:
            s = states[i]
            placed[i] = True
            old = self._row.get(s)
            if old is not None and old < n:
                continue
            row = holes.pop(0)
            self._evict(row)
            s.rehome(self.k[:, row : row + 1], self.v[:, row : row + 1])  # copies from where it was
            if old is not None:
                self._owners[old] = None
            self._owners[row] = weakref.ref(s)
            self._row[s] = row
        return placed

    # -- one decoding step --------------------------------------------------------------------

    def begin(self, states: Sequence[RingKV]) -> None:
        """Gather what every state's ``begin(1)`` prepared into the step's batched tables."""
        self._plan = _Plan(self, states)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (K, H, 1, D), k and v (K, KV, 1, D) of the placed states, in ``begin``'s order;
        returns (K, H, 1, D)."""
        plan = self._plan
        n_k, h, _, d = q.shape
        kv = k.shape[1]
        dtype = self.k.dtype
        kbuf, vbuf = self.k[layer], self.v[layer]  # (P, KV, N, D)
        kbuf[plan.rows, :, plan.slots] = torch.bmm(k.reshape(n_k, kv, d).float(), plan.rk).to(dtype)
        vbuf[plan.rows, :, plan.slots] = v.reshape(n_k, kv, d).to(dtype)
        qq = torch.bmm(q.reshape(n_k, h, d).float(), plan.rq).to(dtype)  # (K, H, D or 2D): rows (kv, g)
        span = plan.span
        if not plan.identity:
            full = qq.new_empty(span, h, qq.shape[-1])  # rows are a permutation of 0..K-1
            full.index_copy_(0, plan.rows, qq)
            qq = full
        out = self.kernel.one(qq.view(span * h, -1), kbuf[:span], vbuf[:span], plan.bias, (span, h, kv, d),
                              sink_mask=plan.sinks).view(span, h, d)
        if not plan.identity:
            out = out.index_select(0, plan.rows)
        return out.view(n_k, h, 1, d).to(q.dtype)


class PoolSet:
    """One ``KVPool`` per ring size, so streams of different sizes (in ``endless serve``,
    conversations whose pinned prefixes differ in length) each attend with their own kind.
    At most ``max_pools`` sizes get a pool; streams of further sizes attend on their own."""

    def __init__(self, model, rows: int, *, max_pools: int = 4) -> None:
        self.model, self.rows, self.max_pools = model, rows, max_pools
        self.pools: dict[int, KVPool] = {}

    def groups(self, states: Sequence) -> list[tuple[KVPool, list[int]]]:
        """Group the states by ring size and place each group of two or more in its pool;
        returns [(pool, indices into ``states``)] of the groups placed."""
        by_size: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            if poolable(s, self.model):
                by_size.setdefault(s.capacity, []).append(i)
        out = []
        for size, idx in by_size.items():
            if len(idx) < 2:  # one state alone gains nothing from a pool
                continue
            pool = self.pools.get(size)
            if pool is None:
                if len(self.pools) >= self.max_pools:
                    continue
                pool = self.pools[size] = KVPool(self.model, self.rows, size)
            placed = pool.place([states[i] for i in idx])
            got = [i for i, p in zip(idx, placed, strict=True) if p]
            if len(got) > 1:
                out.append((pool, got))
        return out

    def row_of(self, state) -> int | None:
        """The row ``state`` holds in the pool of its size, if any."""
        pool = self.pools.get(getattr(state, "capacity", None))
        return None if pool is None else pool.row_of(state)


class _Plan:
    """One step's batched tables: rows, slots, rotations, bias and sink columns of the placed states."""

    def __init__(self, pool: KVPool, states: Sequence[RingKV]) -> None:
        dev = pool.k.device
        steps = [s.prepared for s in states]
        rows = [pool.row_of(s) for s in states]
        self.span = max(rows) + 1
        self.identity = rows == list(range(len(rows)))
        self.rows = torch.tensor(rows, dtype=torch.long, device=dev)
        self.slots = torch.cat([st.slots for st in steps])
        self.rk = torch.stack([st.rk for st in steps])  # (K, D, D) float32
        d = self.rk.shape[-1]
        with_sinks = [st.rq.shape[1] == 2 * d for st in steps]
        n = pool.capacity
        self.zero_sink = bool(pool.model.zero_sink)
        if any(with_sinks):
            # a state without sink tables scores its (absent) sink columns with its own query
            self.rq = torch.stack([st.rq if w else torch.cat([st.rq, st.rq], dim=1)
                                   for st, w in zip(steps, with_sinks, strict=True)])
            mask = torch.zeros(self.span, 1, 1, n, dtype=torch.bool)
            for r, s, w in zip(rows, states, with_sinks, strict=True):
                if w:
                    mask[r, ..., : s.n_sinks] = True
            self.sinks = mask.to(dev)
        else:
            self.rq = torch.stack([st.rq for st in steps])
            self.sinks = None
        bias = torch.zeros(self.span, 1, 1, n, dtype=pool.k.dtype, device=dev)  # 0 / -inf: exact in any dtype
        bias[self.rows] = torch.stack([st.bias for st in steps]).view(len(rows), 1, 1, n)
        self.bias = bias


__all__ = ["KVPool", "PoolSet", "poolable"]
