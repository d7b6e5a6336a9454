"""The FAM's own computations (docs/methods.md section 3, "One layer, one block").

- ``FamPrompt``: F learned embeddings at the token-embedding level: the only new weights.
  *Ours*: initialised from the embeddings of a short word's tokens (cycled to F rows).
- ``initial_fam``: the prompt passed up the stack, attending among itself only (positions
  -F..-1, just before the first block); layer l's initial FAM is the prompt's hidden state at the
  input of layer l. It depends only on the weights, so inference computes it once.
- ``fam_update``: FAM rows (queries from the previous FAM, positions of the previous FAM)
  attend to the previous FAM and the whole current block (no memory blocks), residual from the
  previous FAM (zero on the very first update), then the layer's own FFN (with ``gate``, scaled
  by the row's attention mass on real keys). The new FAM takes the
  positions of the block's last F tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from endless.attention import softmax_attention
from endless.policies.spec import FAM
from endless.rope import rotate
from endless.transformer import Transformer


class FamPrompt(nn.Module):
    """F x d learned embeddings: the initial working memory before any block was read."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(rows.detach().clone())

    @classmethod
    def from_tokens(cls, model: Transformer, token_ids: list[int], n: int) -> "FamPrompt":
        """Initialise from the embeddings of ``token_ids`` (e.g. the word " summary"), cycled to n."""
        if n == 0:
            return cls(model.embed_tokens.weight.new_zeros(0, model.dims.hidden))
        ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(n)], device=model.device)
        return cls(model.embed_tokens.weight[ids].float())

    @classmethod
    def neutral(cls, model: Transformer, n: int) -> "FamPrompt":
        """An untrained prompt: the mean token embedding, n times (what a FAM stream uses when no
        trained checkpoint gives one)."""
        mean = model.embed_tokens.weight.float().mean(dim=0, keepdim=True)
        return cls(mean.expand(n, -1))

    @property
    def rows(self) -> int:
        return self.embeddings.shape[0]


def fam_positions(block_index: int | torch.Tensor, policy: FAM) -> torch.Tensor:
    """Positions of the FAM that block ``block_index`` reads: the previous block's last F
    positions (for block 0: -F..-1, where the prompt sits)."""
    return int(block_index) * policy.block - policy.fam + torch.arange(policy.fam)


def initial_fam(model: Transformer, prompt: FamPrompt) -> list[torch.Tensor]:
    """Per layer, the initial FAM (F, d): the prompt's input to that layer."""
    f = prompt.rows
    x = prompt.embeddings.to(model.dtype)[None]  # (1, F, d)
    cos, sin = model.rope.tables(torch.arange(-f, 0), model.dtype)
    out = []
    for i in range(model.dims.n_layers):
        out.append(x[0])
        q, k, v = model.qkv(i, x)
        o = softmax_attention(rotate(q, cos, sin) * model.scale, rotate(k, cos, sin), v)
        x = model.finish(i, x, o)
    return out


def fam_qkv(model: Transformer, i: int, fam: torch.Tensor, positions: torch.Tensor | None = None, *,
            tables: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Rotated q (B, H, F, D) and k, v (B, KV, F, D) of FAM rows ``fam`` (B, F, d) at ``positions``
    (or with their RoPE ``tables`` (F, D) already computed)."""
    q, k, v = model.qkv(i, fam)
    cos, sin = tables if tables is not None else model.rope.tables(positions, model.dtype)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def fam_update(
    model: Transformer,
    i: int,
    fam: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    fv: torch.Tensor,
    block_k: torch.Tensor,
    block_v: torch.Tensor,
    *,
    first: bool | torch.Tensor,
    policy: FAM,
) -> torch.Tensor:
    """New FAM (B, F, d) of layer ``i`` from the previous one and the block's rotated keys/values.

    ``fq, fk, fv`` are the previous FAM's projections at its positions; ``block_k, block_v``
    (B, KV, Bl, D) the whole current block's keys/values of this layer. ``first``: this is the
    stream's first update (zero residual); a bool tensor (B,) says so per row, for a batch whose
    rows start from different states (``parallel_forward``'s ``fresh``).
    """
    if i == 0 and policy.skip_first:  # *ours* (FAM.skip_first): layer 0 keeps its initial FAM
        return fam
    probs: list | None = [] if policy.gate else None
    o = softmax_attention(fq * model.scale, torch.cat([fk, block_k], dim=2), torch.cat([fv, block_v], dim=2),
                          null_slot=policy.null_slot, probs=probs)
    b, _, c, _ = o.shape
    attn = model.layers[i].self_attn.o_proj(o.transpose(1, 2).reshape(b, c, -1))
    # the paper: zero residual on the very first update (``firstres`` keeps it, see FAM)
    if isinstance(first, torch.Tensor):
        keep = (~first | policy.first_residual).to(fam.dtype)[:, None, None]
        a = fam * keep + attn
    else:
        a = attn if first and not policy.first_residual else fam + attn
    if policy.update_ffn:
        layer = model.layers[i]
        ffn = layer.mlp(layer.post_attention_layernorm(a))
        if probs:  # *ours* (FAM.gate): the FFN writes as much as the row attended to real keys
            mass = probs[0].sum(-1).mean(dim=(1, 2))  # (B, KV, G, F, N) -> (B, F)
            ffn = ffn * mass[..., None].to(ffn.dtype)
        a = a + ffn
    if policy.normalize:  # *ours*: keep the state on the unit-RMS sphere (see FAM.normalize)
        a = a * torch.rsqrt(a.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(a.dtype)
    return a
