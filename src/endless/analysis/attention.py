"""Attention maps and attention sinks (docs/methods.md section 2, Figure 2 and its motivation).

Contract: ``attention_maps`` runs our forward path densely (causal, positions 0..N-1) over a
short text and returns every layer's and head's attention probabilities (L, H, N, N), float32:
the same numbers the model attends with (the backend here is the dense causal reference,
checked against transformers' own ``output_attentions`` in tests/test_eval.py).
``first_k_share`` is the share of each query's attention on the first k tokens, averaged over
the queries that have more than k tokens to choose from; under uniform attention it would be
about k / (mean query length), which is what the figures compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from endless.attention import additive, softmax_attention
from endless.rope import rotate
from endless.transformer import Transformer


class _Recorder:
    """Dense causal attention over one pass that keeps each layer's probabilities."""

    def __init__(self, model: Transformer, n: int) -> None:
        self.model = model
        self.cos, self.sin = model.rope.tables(torch.arange(n), torch.float64)
        self.bias = additive(torch.ones(n, n, dtype=torch.bool, device=model.device).tril())
        self.maps: list[torch.Tensor] = []

    def begin(self, n: int) -> None:
        pass

    def end(self) -> None:
        pass

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos.to(q.dtype), self.sin.to(q.dtype)
        q, k = rotate(q, cos, sin) * self.model.scale, rotate(k, cos, sin)
        probs: list[torch.Tensor] = []
        out = softmax_attention(q, k, v, self.bias, null_slot=self.model.zero_sink, probs=probs)
        b, kv, g, n, _ = probs[0].shape  # (B, KV, G, N, N) float32
        self.maps.append(probs[0].reshape(b, kv * g, n, n)[0])
        return out


@torch.inference_mode()
def attention_maps(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """(L, H, N, N) attention probabilities of every layer and head for ``ids`` (N,)."""
    rec = _Recorder(model, ids.numel())
    model.forward(ids[None].to(model.device), rec, last_only=True)
    return torch.stack(rec.maps).cpu()


def first_k_share(maps: torch.Tensor, k: int) -> torch.Tensor:
    """(L, H): mean over queries q >= k of the attention mass on keys 0..k-1."""
    return maps[:, :, k:, :k].sum(-1).mean(-1)


def uniform_share(n: int, k: int) -> float:
    """What ``first_k_share`` would be if every query spread its attention evenly."""
    return float(sum(k / (q + 1) for q in range(k, n)) / (n - k))


def plot_maps(maps: torch.Tensor, layers: Sequence[int], path: "str | Path", *, tokens: int = 32,
              labels: Sequence[str] | None = None) -> None:
    """Heatmaps of the head-averaged attention of ``layers`` over the first ``tokens`` tokens
    (log colour scale, as in the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from endless.files import save_png

    n = min(tokens, maps.shape[-1])
    fig, axes = plt.subplots(1, len(layers), figsize=(3.0 * len(layers), 3.3), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        m = maps[layer, :, :n, :n].mean(0).numpy()
        m[m <= 0] = float("nan")  # the masked (future) half: left blank
        im = ax.imshow(m, cmap="viridis", norm=LogNorm(vmin=1e-3, vmax=1.0))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        if labels is not None and n <= 16:
            ax.set_xticks(range(n), [repr(t)[1:-1][:6] for t in labels[:n]], rotation=90, fontsize=6)
            ax.set_yticks(range(n), [repr(t)[1:-1][:6] for t in labels[:n]], fontsize=6)
    axes[0][0].set_ylabel("query", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="attention (mean over heads)")
    save_png(fig, path, bbox_inches="tight")


def plot_token0(share0: torch.Tensor, path: "str | Path", *, uniform: float, title: str) -> None:
    """Per-layer bar chart of the attention on token 0 (mean over heads; whiskers: head range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from endless.files import save_png

    mean, lo, hi = share0.mean(1), share0.min(1).values, share0.max(1).values
    x = torch.arange(share0.shape[0]).numpy()
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    ax.bar(x, mean.numpy(), color="tab:blue", label="mean over heads")
    ax.errorbar(x, mean.numpy(), yerr=[(mean - lo).numpy(), (hi - mean).numpy()], fmt="none", ecolor="grey",
                lw=0.8, capsize=2, label="min-max over heads")
    ax.axhline(uniform, color="tab:red", ls="--", lw=1, label=f"uniform attention ({uniform:.3f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of attention on token 0")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


__all__ = ["attention_maps", "first_k_share", "plot_maps", "plot_token0", "uniform_share"]
