"""The exact layer-major schedule of TransformerFAM (docs/methods.md section 3, *ours*).

Per layer: project every token at once; run only the cheap FAM recurrence block by block (F rows
per block); then every token's attention and FFN in parallel, each block attending to a window
of its M previous blocks, its own block (causal) and the FAM it was given. With F=0 this is the
parallel form of BSWA. Used for training (autograd flows through the recurrence) and for
evaluation of sequences that fit in memory; ``endless.fam.state.FamState`` is the streaming form
and agrees with this one to float tolerance.

Memory is O(N x (M+1) x B) for the scores (blocks are windowed with ``unfold``), never N^2.
``checkpoint=True`` keeps only each layer's input for the backward pass and recomputes the layer
(the FAM recurrence included): what long training sequences on a GPU need. ``fused`` (default:
``endless.device.fused_window_attention``, on CUDA and the CPU) runs the windowed attention
through PyTorch's fused ``scaled_dot_product_attention`` with the same mask; ``fused=False`` (or
``ENDLESS_FUSED_ATTENTION=0``) the einsum products with a float32 softmax, the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from endless.attention import window_attention
from endless.device import fused_window_attention
from endless.fam.memory import FamPrompt, fam_qkv, fam_update, initial_fam
from endless.policies.spec import BSWA, FAM
from endless.rope import rotate, rotate_signed, signed_tables
from endless.transformer import Transformer


def block_mask(policy: FAM, n_blocks: int, device: "torch.device | str" = "cpu") -> torch.Tensor:
    """(nb, Bl, (M+1)*Bl + F) visibility of window and FAM keys for every block's queries: the
    BSWA mask of ``endless.masks`` on the stream indices of each block's window (padding before
    the stream is invisible), then the F FAM columns, visible to all."""
    bl, m, f = policy.block, policy.memory, policy.fam
    blocks = torch.arange(n_blocks, device=device)[:, None, None]
    q = blocks * bl + torch.arange(bl, device=device)[None, :, None]  # (nb, Bl, 1) query indices
    k = (blocks - m) * bl + torch.arange((m + 1) * bl, device=device)[None, None, :]  # (nb, 1, S) key indices
    win = (k >= 0) & policy.as_bswa().mask()(q, k)
    return torch.cat([win, torch.ones(n_blocks, bl, f, dtype=torch.bool, device=device)], dim=-1)


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
    checkpoint: bool = False,
    fused: bool | None = None,
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
    ``checkpoint`` recomputes each layer in the backward pass (activation memory of one layer);
    ``fused`` picks PyTorch's fused attention (default: ``fused_window_attention``).
    """
    if isinstance(policy, BSWA):
        policy = FAM(policy.block, policy.memory, 0)
    dev = model.device
    ids = ids.to(dev)
    if fused is None:
        fused = fused_window_attention()
    bsz, n = ids.shape
    bl, m, f = policy.block, policy.memory, policy.fam
    nb = -(-n // bl)
    pad = nb * bl - n
    x = model.embed_tokens(F.pad(ids, (0, pad)))  # (B, N', d); padding only follows real tokens
    fam0: list[torch.Tensor | None] = [None] * model.dims.n_layers
    first = False
    if f:
        if init_state is not None:
            fam0 = init_state
            first = fresh.to(dev) if fresh is not None else False
        else:
            fam0 = [t[None].expand(bsz, -1, -1) for t in initial_fam(model, prompt)]
            first = True
    # one table for the FAM positions and the tokens: block b's FAM sits at rows b*Bl .. b*Bl+F-1
    cos_all, sin_all = model.rope.tables(torch.arange(-f, nb * bl), model.dtype)
    # the tokens rotate as in the streaming state (``FamState.begin``): float32 tables, the scale
    # folded into the query's, one rounding; so both forms compute the same numbers
    kcos, ksin = signed_tables(model.rope, torch.arange(nb * bl))
    qcos, qsin = (kcos * model.scale).float(), (ksin * model.scale).float()
    kcos, ksin = kcos.float(), ksin.float()
    mask = block_mask(policy, nb, dev)
    d = model.dims

    def layer(i: int, x: torch.Tensor, fam: torch.Tensor | None):
        q, k, v = model.qkv(i, x)
        q, k = rotate_signed(q, qcos, qsin), rotate_signed(k, kcos, ksin)
        # (B, KV, nb, (M+1)Bl, D): each block's window of memory blocks + itself
        kw = F.pad(k, (0, 0, m * bl, 0)).unfold(2, (m + 1) * bl, bl).transpose(-1, -2)
        vw = F.pad(v, (0, 0, m * bl, 0)).unfold(2, (m + 1) * bl, bl).transpose(-1, -2)
        if f:
            fk_all, fv_all, start = [], [], fam
            static_q = model.qkv(i, start)[0] if policy.static_query else None  # un-rotated
            for b in range(nb):
                tables = (cos_all[b * bl : b * bl + f], sin_all[b * bl : b * bl + f])
                fq, fk, fv = fam_qkv(model, i, fam, tables=tables)
                if static_q is not None:  # ablation: the same summary query for every block
                    fq = rotate(static_q, *tables)
                fk_all.append(fk)
                fv_all.append(fv)
                if b < nb - 1 or return_state:
                    sl = slice(b * bl, (b + 1) * bl)
                    fam = fam_update(model, i, fam, fq, fk, fv, k[:, :, sl], v[:, :, sl],
                                     first=first if b == 0 else False, policy=policy)
                    if policy.detach:
                        fam = fam.detach()
            kw = torch.cat([kw, torch.stack(fk_all, dim=2).to(kw.dtype)], dim=3)
            vw = torch.cat([vw, torch.stack(fv_all, dim=2).to(vw.dtype)], dim=3)
        o = window_attention(q, kw, vw, mask, fused=fused)
        return model.finish(i, x, o), fam

    final = []
    for i in range(d.n_layers):
        if checkpoint and torch.is_grad_enabled():
            x, fam = grad_checkpoint(layer, i, x, fam0[i], use_reentrant=False)
        else:
            x, fam = layer(i, x, fam0[i])
        if f:
            final.append(fam)
    x = x[:, :n]
    logits = model.logits(x) if select is None else model.logits(x[select.to(dev)][None])[0]
    return (logits, final) if return_state else logits
