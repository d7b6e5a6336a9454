"""Naive oracles the streaming runtime is tested against (never used for real work).

``naive_stream_logits`` is how the original StreamingLLM code works, written as plainly as
possible: tokens one at a time; every layer keeps the un-rotated key and the value of every token
(it never evicts); at each step it selects the keys the policy lets the token see, rotates them
afresh at their in-cache positions 0..n-1 (the query sits at n-1) and attends with a plain
softmax (off by one for a zero-sink model, ``endless.zero_sink``). O(n) re-rotation per token and unbounded memory -- exactly what ``RingKV`` avoids -- but
obviously right, so "the sinks policy equals the naive reference at every step" is checkable.

``naive_fam_logits`` is TransformerFAM read straight off docs/methods.md section 3 ("One layer, one
block" and the mask table), on transformers' own modules and rotary embedding: none of
``endless.transformer``, ``endless.rope`` or ``endless.fam`` is used, so it checks the spec, not our
factoring of it. It runs in the streaming order (block by block, every layer per block) while
``endless.fam.parallel_forward`` runs layer by layer over all blocks.
"""

from __future__ import annotations

import torch

from endless.policies.spec import FAM, Policy, parse_policy
from endless.rope import rotate
from endless.transformer import Transformer


@torch.inference_mode()
def naive_stream_logits(model: Transformer, ids: torch.Tensor, policy: "Policy | str") -> torch.Tensor:
    """Logits (1, T, V) of a single stream ``ids`` (1, T) under ``policy``, token by token."""
    policy = parse_policy(policy)
    prefix = len(policy.prefix())
    if prefix:  # the sink copies of sinks:S+W,sink=#ID, read before the stream
        ids = torch.cat([torch.tensor(policy.prefix(), dtype=torch.long, device=ids.device)[None], ids], dim=1)
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
            s = (qq @ kk.transpose(-1, -2)).float() * model.scale
            if model.zero_sink:  # softmax-off-by-one: one more score of 0 whose weight goes nowhere
                p = torch.softmax(torch.cat([s, s.new_zeros(*s.shape[:-1], 1)], dim=-1), dim=-1)[..., :-1].to(vv.dtype)
            else:
                p = torch.softmax(s, dim=-1).to(vv.dtype)
            x = model.finish(i, x, p @ vv)
        out.append(model.logits(x))
    return torch.cat(out, dim=1)[:, prefix:]


def _attend(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The HF layer's output projection of softmax attention (q (B, H, n, D); k, v (B, KV, m, D))."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * layer.self_attn.scaling
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    b, _, n, _ = q.shape
    return layer.self_attn.o_proj((p @ v).transpose(1, 2).reshape(b, n, -1))


def _qkv(hf, layer, x: torch.Tensor, positions: torch.Tensor):
    """Rotated q (B, H, n, D), k and v (B, KV, n, D) of rows ``x`` at ``positions``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, n, _ = x.shape
    d = hf.config.head_dim
    h = layer.input_layernorm(x)
    q = layer.self_attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
    k = layer.self_attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
    v = layer.self_attn.v_proj(h).view(b, n, -1, d).transpose(1, 2)
    cos, sin = hf.model.rotary_emb(x, positions[None].expand(b, -1))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _ffn(layer, a: torch.Tensor) -> torch.Tensor:
    return a + layer.mlp(layer.post_attention_layernorm(a))


@torch.no_grad()
def naive_fam_logits(hf, ids: torch.Tensor, policy: "FAM | str", prompt: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of ``ids`` (B, T) under a FAM policy, for a Llama ``hf`` (transformers) and
    the learned prompt embeddings ``prompt`` (F, d). Covers the paper's update and ``firstres``."""
    policy = parse_policy(policy)
    if not isinstance(policy, FAM) or policy.static_query or policy.detach or policy.normalize or policy.null_slot or policy.skip_first or not policy.update_ffn:
        raise ValueError("the oracle covers the paper's FAM update (and firstres) only")
    bl, m, f = policy.block, policy.memory, policy.fam
    layers = hf.model.layers
    bsz = ids.shape[0]
    # initial FAM: the prompt passed up the stack, full attention among its own rows, positions -F..-1
    x = prompt[None].expand(bsz, -1, -1).to(hf.dtype)
    fam_pos = torch.arange(-f, 0)
    fam = []
    for layer in layers:
        fam.append(x)
        q, k, v = _qkv(hf, layer, x, fam_pos)
        x = _ffn(layer, x + _attend(layer, q, k, v, torch.ones(f, f, dtype=torch.bool)))
    past: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]  # every earlier block's k, v
    out = []
    for start in range(0, ids.shape[1], bl):
        h = hf.model.embed_tokens(ids[:, start : start + bl])
        n = h.shape[1]
        pos = torch.arange(start, start + n)
        fam_pos = torch.arange(start - f, start)  # the last F positions of the block before
        for i, layer in enumerate(layers):
            q, k, v = _qkv(hf, layer, h, pos)
            fq, fk, fv = _qkv(hf, layer, fam[i], fam_pos)
            mem = past[i][-m:] if m else []
            mk = [t[0] for t in mem]
            mv = [t[1] for t in mem]
            width = sum(t.shape[2] for t in mk)
            # block row t: every memory key, every FAM key, its own block causally (the mask table)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            visible = torch.cat([torch.ones(n, width + f, dtype=torch.bool), causal], dim=1)
            a = h + _attend(layer, q, torch.cat([*mk, fk, k], dim=2), torch.cat([*mv, fv, v], dim=2), visible)
            # FAM rows: every FAM key and the whole current block, no memory blocks
            fa = _attend(layer, fq, torch.cat([fk, k], dim=2), torch.cat([fv, v], dim=2),
                         torch.ones(f, f + n, dtype=torch.bool))
            first = start == 0 and not policy.first_residual  # the paper: zero residual on the very first update
            fam[i] = _ffn(layer, fa if first else fam[i] + fa)
            past[i].append((k, v))
            h = _ffn(layer, a)
        out.append(hf.lm_head(hf.model.norm(h)))
    return torch.cat(out, dim=1)
