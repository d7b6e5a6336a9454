"""Rotary position embedding (RoPE) with exact angles.

Contract (docs/methods.md section 2, "positions counted inside the cache"):

- Angles are computed in float64 from int64 positions and only then cast to the compute dtype.
  float32 angles at position ~10^6 are off by ~0.06 rad; float64 ones by ~1e-10 rad, so the
  attention scores at token 1,000,000 are as exact as at token 1,000. No angle is ever formed
  from a float32 position.
- Keys are rotated once, when they enter a cache, at their absolute index. RoPE scores depend
  only on ``query_pos - key_pos``, so the sinks policy never re-rotates a cached key: it rotates
  the *query* a second time, at its in-cache position, for the few sink columns (see
  ``endless.policies.ring``). That is O(heads x dim) per token instead of O(cache).
- The inverse frequencies (including Llama-3 / YaRN style scaling) and the attention scaling are
  taken from the transformers model itself, so every rope type it precomputes is supported.
- Tables are computed on the device the ``Rope`` lives on (``Rope.to``: the model's), whatever
  device the positions come from: float64 is exact on CUDA too, and the tables then never cross
  from host to device inside a layer.
"""

from __future__ import annotations

import torch


class Rope:
    """Cos/sin tables for arbitrary integer positions, computed in float64."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                 device: "torch.device | str" = "cpu") -> None:
        self.inv_freq = inv_freq.detach().to(device=device, dtype=torch.float64)  # (D/2,)
        self.attention_scaling = float(attention_scaling)
        self.head_dim = 2 * self.inv_freq.numel()

    @classmethod
    def from_hf(cls, hf_model: torch.nn.Module) -> "Rope":
        """Read inv_freq and attention scaling from a transformers model's rotary module."""
        rotary = hf_model.model.rotary_emb
        return cls(rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0), rotary.inv_freq.device)

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    def to(self, device: "torch.device | str") -> "Rope":
        """The same rotary tables, computed on ``device``."""
        return Rope(self.inv_freq, self.attention_scaling, device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (len(positions), D) for int64 ``positions``, on this Rope's device."""
        positions = positions.to(device=self.inv_freq.device, dtype=torch.float64)
        angles = positions[:, None] * self.inv_freq[None, :]  # (C, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (C, D), the rotate_half layout
        cos = (angles.cos() * self.attention_scaling).to(dtype)
        sin = (angles.sin() * self.attention_scaling).to(dtype)
        return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x`` (..., C, D) with tables (C, D) in the rotate_half convention."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def signed_tables(rope: Rope, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos and sin (C, D) with the first half of sin negated, for ``rotate_signed``; the
    caller folds in a query's scale before the one cast to the compute dtype."""
    cos, sin = rope.tables(positions, torch.float64)
    half = sin.shape[-1] // 2
    sin[:, :half].neg_()
    return cos, sin


def rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``rotate`` in three ops with ``signed_tables``: rotate_half(x) = roll(x, D/2) * [-1.., +1..],
    and the sign is in ``signed_sin`` already (negation is exact, so the values are the same).
    Computed in the tables' dtype (float32 in the runtime) and rounded once to ``x``'s."""
    xf = x.to(cos.dtype)
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, -1), signed_sin).to(x.dtype)


def rotation_matrix(cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE at one position as a (D, D) matrix M with ``rotate(x) == x @ M`` (rotate_half layout):
    M[i, i] = cos_i and M[(i + D/2) % D, i] = signed_sin_i. The zeros add exactly nothing. A
    decoded token's rotation is then one small product instead of a dozen element-wise ops."""
    d = cos.numel()
    m = torch.diag(cos)
    i = torch.arange(d, device=cos.device)
    m[(i + d // 2) % d, i] = signed_sin
    return m
