"""The "zero sink" (SoftMax-off-by-One) as a model option, for our path and for transformers'.

"Efficient Streaming Language Models with Attention Sinks", section 3.3: a softmax with one more
term in its denominator, ``exp(x_i) / (1 + sum_j exp(x_j))``, is attention over one extra key whose
score is 0 and whose value is 0 -- so a head may put (part of) its weight "nowhere" instead of
on an initial token. A model trained that way says so in its config: ``endless_zero_sink: true``
in config.json (``CONFIG_KEY``). Then

- our forward path (``endless.transformer.Transformer``) and every policy attend with it
  (``endless.attention.Kernel(zero_sink=True)``, ``softmax_attention(null_slot=True)``);
- transformers' own modules attend with it through its public attention registry:
  ``register()`` adds ``ATTN_IMPLEMENTATION`` to ``transformers.AttentionInterface`` (and the
  eager additive mask to ``AttentionMaskInterface`` under the same name), and
  ``endless.models.load`` loads such a folder with ``attn_implementation=ATTN_IMPLEMENTATION``,
  so ``hf_model(ids).logits`` is the same model (``endless verify`` compares the two).

``naive_off_by_one`` is the reference both are tested against (tests/test_sink_pretrain.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONFIG_KEY = "endless_zero_sink"
ATTN_IMPLEMENTATION = "endless_zero_sink"


def uses_zero_sink(config) -> bool:
    """Whether a transformers config asks for softmax-off-by-one attention."""
    return bool(getattr(config, CONFIG_KEY, False))


def naive_off_by_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax-off-by-one attention, written out: q (B, H, T, D), k, v (B, H, T, D) with
    the same number of heads; ``exp(s_ij) / (1 + sum_j' exp(s_ij'))`` over j <= i, in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    e = torch.exp(s).masked_fill(~causal, 0.0)
    return ((e / (1.0 + e.sum(-1, keepdim=True))) @ v.double()).to(q.dtype)


def zero_sink_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (``AttentionInterface``): query (B, H, T, D), key
    and value (B, KV, S, D), ``attention_mask`` the eager additive mask (B, 1, T, S) or None
    (then causal); returns (B, T, H, D) and no weights.

    The off-by-one term is one more key of zeros with a value of zeros: its score q.0 is exactly
    0, so PyTorch's fused attention computes the zero-sink softmax as it is."""
    b, kv, s, d = key.shape
    g = query.shape[1] // kv
    if g > 1:  # grouped-query attention: head h reads KV head h // g
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    zeros = key.new_zeros(b, key.shape[1], 1, d)
    key, value = torch.cat([key, zeros], dim=2), torch.cat([value, zeros], dim=2)
    t = query.shape[2]
    if attention_mask is None:  # causal, the queries being the last t of the s keys
        visible = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
        bias = torch.zeros(t, s, dtype=query.dtype, device=query.device).masked_fill(~visible, float("-inf"))
    else:
        bias = attention_mask[..., :s].to(query.dtype)
    bias = F.pad(bias, (0, 1))  # the zero key is visible to every query
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the zero-sink attention (and the eager mask it reads) with transformers under
    ``ATTN_IMPLEMENTATION``; idempotent. Returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, zero_sink_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    return ATTN_IMPLEMENTATION


__all__ = ["ATTN_IMPLEMENTATION", "CONFIG_KEY", "naive_off_by_one", "register", "uses_zero_sink", "zero_sink_attention"]
