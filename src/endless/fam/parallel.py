"""The exact layer-major schedule of TransformerFAM (PAPERS.md section 3, *ours*).

Per layer: project every token at once; run only the cheap FAM recurrence block by block (F rows
per block); then every token's attention and FFN in parallel, each block attending to a window
of its M previous blocks, its own block (causal) and the FAM it was given. With F=0 this is the
parallel form of BSWA. Used for training (autograd flows through the recurrence) and for
evaluation of sequences that fit in memory; ``endless.fam.state.FamState`` is the streaming form
and agrees with this one to float tolerance.

Memory is O(N x (M+1) x B) for the scores (blocks are windowed with ``unfold``), never N^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from endless.config import BSWA, FAM
from endless.fam.memory import FamPrompt, fam_positions, fam_qkv, fam_update, initial_fam
from endless.model import Transformer
from endless.rope import rotate


def block_mask(policy: FAM, n_blocks: int) -> torch.Tensor:
    """(nb, Bl, (M+1)*Bl + F) visibility of window and FAM keys for every block's queries."""
    bl, m, f = policy.block, policy.memory, policy.fam
    s = torch.arange((m + 1) * bl)
    q = torch.arange(bl)
    own = s[None, :] - m * bl  # index inside the own block (negative: memory blocks)
    causal = own <= q[:, None]  # (Bl, (M+1)Bl)
    first_key = (torch.arange(n_blocks)[:, None] - m) * bl + s[None, :]  # absolute key index
    exists = first_key >= 0  # memory blocks before the stream are padding
    win = causal[None] & exists[:, None, :]
    fam = torch.ones(n_blocks, bl, f, dtype=torch.bool)
    return torch.cat([win, fam], dim=-1)


def parallel_forward(
    model: Transformer,
    ids: torch.Tensor,
    policy: "FAM | BSWA",
    prompt: FamPrompt | None = None,
    *,
    init_state: list[torch.Tensor] | None = None,
    return_state: bool = False,
    select: torch.Tensor | None = None,
    fresh: torch.Tensor | None = None,
):
    """Logits (B, N, V) of ``ids`` (B, N) under FAM (or BSWA) from the stream's start.

    ``init_state`` (per layer (B, F, d)) replaces the initial FAM (random state passing); with
    ``return_state`` the final FAM of every layer is returned too, as ``(logits, state)``.
    ``select`` (bool (B, N)) returns the logits of the selected positions only, (K, V) in
    row-major order: scoring a few answer tokens then skips the LM head over a large vocabulary
    at every other position (it costs more than all the layers of a small model).
    ``fresh`` (bool (B,), with ``init_state``): the rows whose ``init_state`` is the learned initial
    FAM, which get the stream's zero first residual as without ``init_state``; the other rows
    continue a state (a batch that mixes both, ``endless.train.tiny``'s unexplored states).
    """
    if isinstance(policy, BSWA):
        policy = FAM(policy.block, policy.memory, 0)
    bsz, n = ids.shape
    bl, m, f = policy.block, policy.memory, policy.fam
    nb = -(-n // bl)
    pad = nb * bl - n
    x = model.embed_tokens(F.pad(ids, (0, pad)))  # (B, N', d); padding only follows real tokens
    if f:
        if init_state is not None:
            fam0 = init_state
            first = fresh if fresh is not None else False
        else:
            fam0 = [t[None].expand(bsz, -1, -1) for t in initial_fam(model, prompt)]
            first = True
    cos, sin = model.rope.tables(torch.arange(nb * bl), model.dtype)
    mask = block_mask(policy, nb)
    d = model.dims
    g = d.n_heads // d.n_kv_heads
    final = []
    for i in range(d.n_layers):
        q, k, v = model.qkv(i, x)
        q, k = rotate(q, cos, sin) * model.scale, rotate(k, cos, sin)
        # (B, KV, nb, (M+1)Bl, D): each block's window of memory blocks + itself
        kw = F.pad(k, (0, 0, m * bl, 0)).unfold(2, (m + 1) * bl, bl).transpose(-1, -2)
        vw = F.pad(v, (0, 0, m * bl, 0)).unfold(2, (m + 1) * bl, bl).transpose(-1, -2)
        if f:
            fk_all, fv_all, fam = [], [], fam0[i]
            static_q = model.qkv(i, fam0[i])[0] if policy.static_query else None  # un-rotated
            for b in range(nb):
                pos = fam_positions(b, policy)
                fq, fk, fv = fam_qkv(model, i, fam, pos)
                if static_q is not None:  # ablation: the same summary query for every block
                    fq = rotate(static_q, *model.rope.tables(pos, model.dtype))
                fk_all.append(fk)
                fv_all.append(fv)
                if b < nb - 1 or return_state:
                    sl = slice(b * bl, (b + 1) * bl)
                    fam = fam_update(model, i, fam, fq, fk, fv, k[:, :, sl], v[:, :, sl],
                                     first=first if b == 0 else False, policy=policy)
                    if policy.detach:
                        fam = fam.detach()
            final.append(fam)
            kw = torch.cat([kw, torch.stack(fk_all, dim=2)], dim=3)
            vw = torch.cat([vw, torch.stack(fv_all, dim=2)], dim=3)
        qb = q.reshape(bsz, d.n_kv_heads, g, nb, bl, d.head_dim)
        scores = torch.einsum("bkgnqd,bknsd->bkgnqs", qb, kw).float()
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(vw.dtype)
        o = torch.einsum("bkgnqs,bknsd->bkgnqd", p, vw).reshape(bsz, d.n_heads, nb * bl, d.head_dim)
        x = model.finish(i, x, o)
    x = x[:, :n]
    logits = model.logits(x) if select is None else model.logits(x[select][None])[0]
    return (logits, final) if return_state else logits
