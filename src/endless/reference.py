"""Naive oracles the streaming runtime is tested against (never used for real work).

``naive_stream_logits`` is how the original StreamingLLM code works, written as plainly as
possible: tokens one at a time; every layer keeps the un-rotated key and the value of every token
(it never evicts); at each step it selects the keys the policy lets the token see, rotates them
afresh at their in-cache positions 0..n-1 (the query sits at n-1) and attends with a plain
softmax. O(n) re-rotation per token and unbounded memory -- exactly what ``RingKV`` avoids -- but
obviously right, so "the sinks policy equals the naive reference at every step" is checkable.
"""

from __future__ import annotations

import torch

from endless.config import Policy, Sinks, parse_policy
from endless.model import Transformer
from endless.rope import rotate


@torch.inference_mode()
def naive_stream_logits(model: Transformer, ids: torch.Tensor, policy: "Policy | str") -> torch.Tensor:
    """Logits (1, T, V) of a single stream ``ids`` (1, T) under ``policy``, token by token."""
    policy = parse_policy(policy)
    prefix = 0
    if isinstance(policy, Sinks) and policy.sink_token is not None:
        prefix = policy.sinks
        ids = torch.cat([torch.full((1, prefix), policy.sink_token, dtype=torch.long), ids], dim=1)
    mask_fn = policy.mask()
    d = model.dims
    keys: list[list[torch.Tensor]] = [[] for _ in range(d.n_layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(d.n_layers)]
    out = []
    for t in range(ids.shape[1]):
        seen = torch.arange(t + 1)
        visible = seen[mask_fn(torch.tensor(t), seen)]  # stream indices this token attends to
        n = visible.numel()
        cos, sin = model.rope.tables(torch.arange(n), model.dtype)
        x = model.embed_tokens(ids[:, t : t + 1])
        for i in range(d.n_layers):
            q, k, v = model.qkv(i, x)
            keys[i].append(k)
            values[i].append(v)
            kk = torch.cat([keys[i][j] for j in visible.tolist()], dim=2)  # (1, KV, n, D)
            vv = torch.cat([values[i][j] for j in visible.tolist()], dim=2)
            kk = rotate(kk, cos, sin)
            qq = rotate(q, cos[-1:], sin[-1:])
            rep = d.n_heads // d.n_kv_heads
            kk = kk.repeat_interleave(rep, dim=1)
            vv = vv.repeat_interleave(rep, dim=1)
            p = torch.softmax((qq @ kk.transpose(-1, -2)).float() * model.scale, dim=-1).to(vv.dtype)
            x = model.finish(i, x, p @ vv)
        out.append(model.logits(x))
    return torch.cat(out, dim=1)[:, prefix:]
