"""Streaming perplexity (docs/methods.md section 2, "Results to reproduce": Figures 3 and 5, Table 1).

Contract: ``streaming_nll`` reads a token sequence through a ``Stream`` under one policy and
returns each token's negative log-likelihood given everything before it under that policy, in
float64, for tokens 1..N-1 (token 0 has no prediction). Chunked reading is exact, so the
numbers equal token-by-token evaluation (tests/test_eval.py) at a fraction of the cost.
``dense`` is allowed past the model's trained context on purpose: showing it degrade there is
the point of the comparison.

Re-computation (``recompute:W``) costs W+1 token forwards per token, by design. ``recompute_nll``
computes it exactly for every ``every``-th token only (NaN elsewhere) so that the reference of
the sinks ablation takes minutes; comparisons with it are then made on the same tokens
(``table``). With ``every=1`` it equals streaming under ``recompute:W`` token for token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from endless.policies.spec import Dense, Policy, Recompute, parse_policy
from endless.transformer import Transformer


@dataclass
class PplResult:
    """Streaming perplexity of ``policy`` over ``tokens`` scored tokens; ``nll`` per token."""

    policy: str
    tokens: int
    ppl: float
    seconds: float
    nll: torch.Tensor  # (tokens,) float64

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens + 1) / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"policy": self.policy, "tokens": self.tokens, "ppl": self.ppl,
                "log_ppl": math.log(self.ppl), "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 1)}


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over the scored (non-NaN) tokens."""
    return math.exp(float(nll.double().nanmean()))


def streaming_nll(model: Transformer, ids: torch.Tensor, policy: "Policy | str", *, chunk: int = 256,
                  progress: Callable[[int], object] | None = None) -> torch.Tensor:
    """NLL (float64, shape (N-1,)) of tokens 1..N-1 of ``ids`` (N,) read as one stream."""
    from endless.stream import Stream

    pol = parse_policy(policy)
    # Dense runs past the trained context by design; every bounded policy must fit it.
    stream = Stream(model, pol, chunk=chunk, check_context=not isinstance(pol, Dense))
    out = torch.empty(ids.numel(), dtype=torch.float64)
    step = max(chunk, 1024)  # hand the stream big pieces; it chunks them itself
    for lo in range(0, ids.numel(), step):
        part = ids[lo : lo + step]
        out[lo : lo + part.numel()] = -stream.feed(part)[0].double()
        if progress is not None:
            progress(part.numel())
    return out[1:]


@torch.inference_mode()
def recompute_nll(model: Transformer, ids: torch.Tensor, window: int, *, every: int = 1, batch: int = 8,
                  progress: Callable[[int], object] | None = None) -> torch.Tensor:
    """NLL under ``recompute:window`` of tokens 1..N-1, exact, for one token in ``every`` past
    the first window (NaN for the others). Token t is predicted from tokens t-1-W..t-1 run
    afresh at positions 0..W (``endless.policies.recompute.window_logits``); the first W+1
    predictions share one causal pass. ``batch``: predictions per call, for ``progress``."""
    from endless.policies.recompute import window_logits

    n = ids.numel()
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    seq = ids[None].to(model.device)
    first = list(range(1, min(n, window + 1)))  # their window is the whole prefix
    rest = list(range(window + 1, n, every)) if every == 1 else list(range(window + every, n, every))
    for group in [first, *[rest[lo : lo + batch] for lo in range(0, len(rest), batch)]]:
        if not group:
            continue
        logits = window_logits(model, seq, [t - 1 for t in group], window)[0].float().cpu()  # predicts each t
        lp = torch.log_softmax(logits, dim=-1).gather(1, ids[group][:, None])[:, 0]
        out[group] = -lp.double()
        if progress is not None:
            progress(len(group) * every if group is not first else len(group) + 1)
    return out[1:]


def evaluate(model: Transformer, ids: torch.Tensor, policy: "Policy | str", *, chunk: int = 256,
             recompute_every: int = 1, progress: Callable[[int], object] | None = None) -> PplResult:
    """Perplexity of ``policy`` over ``ids``; ``recompute:W`` scores one token in
    ``recompute_every`` past the first window (see ``recompute_nll``)."""
    pol = parse_policy(policy)
    t0 = time.perf_counter()
    if isinstance(pol, Recompute):
        nll = recompute_nll(model, ids, pol.window, every=recompute_every, progress=progress)
    else:
        nll = streaming_nll(model, ids, pol, chunk=chunk, progress=progress)
    scored = int((~nll.isnan()).sum())
    return PplResult(pol.spec, scored, perplexity(nll), time.perf_counter() - t0, nll)


def moving_average(x: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing mean over the last ``window`` positions (fewer at the start), ignoring NaN;
    same length as ``x`` (NaN where the window holds no value)."""
    ok = ~x.isnan()
    c = torch.cat([x.new_zeros(1, dtype=torch.float64), torch.where(ok, x.double(), 0.0).cumsum(0)])
    k = torch.cat([torch.zeros(1, dtype=torch.float64), ok.double().cumsum(0)])
    idx = torch.arange(1, x.numel() + 1)
    lo = (idx - window).clamp(min=0)
    return (c[idx] - c[lo]) / (k[idx] - k[lo])


def ratio_to(result: PplResult, reference: PplResult) -> float:
    """ppl(result) / ppl(reference) on the tokens both scored (a subsampled re-computation
    reference is compared on its own tokens)."""
    both = ~(result.nll.isnan() | reference.nll.isnan())
    return perplexity(result.nll[both]) / perplexity(reference.nll[both])


def table(results: Sequence[PplResult], *, reference: str | None = None) -> str:
    """Plain-text table: policy, tokens, perplexity, ratio to ``reference``'s, tokens/s."""
    ref = next((r for r in results if r.policy == reference), None)
    lines = [f"{'policy':28s} {'tokens':>8s} {'ppl':>10s} {'log ppl':>8s}"
             + (f" {'/ ' + reference:>16s}" if ref else "") + f" {'tokens/s':>9s}"]
    for r in results:
        ratio = f" {ratio_to(r, ref):16.3f}" if ref else ""
        lines.append(f"{r.policy:28s} {r.tokens:8d} {r.ppl:10.3f} {math.log(r.ppl):8.3f}{ratio} {r.tokens_per_s:9.1f}")
    return "\n".join(lines)


def plot(results: Sequence[PplResult], path: "str | Path", *, smooth: int = 256, title: str = "Streaming perplexity",
         marks: Sequence[tuple[int, str]] = ()) -> None:
    """Log-perplexity (trailing moving average of ``smooth`` tokens) against position, one line
    per policy, like the paper's Figures 3 and 5; vertical lines at ``marks`` (position, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from endless.files import save_png

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for r in results:
        y = moving_average(r.nll, smooth)
        x = torch.arange(1, r.nll.numel() + 1)
        ax.plot(x.numpy(), y.numpy(), lw=1.2, label=f"{r.policy} (ppl {r.ppl:.2f})")
    for pos, label in marks:
        ax.axvline(pos, color="grey", ls="--", lw=0.8)
        ax.text(pos, ax.get_ylim()[1], f" {label}", va="top", fontsize=7, color="grey")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel(f"log perplexity (moving average, {smooth} tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def save_nll(results: Sequence[PplResult], path: "str | Path", metadata: dict[str, str] | None = None) -> None:
    """Per-token NLL of every policy in one safetensors file (tensor name = policy spec)."""
    from safetensors.torch import save_file

    from endless.files import atomic_write

    tensors = {r.policy: r.nll.float().contiguous() for r in results}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {}))


__all__ = ["PplResult", "evaluate", "moving_average", "perplexity", "plot", "ratio_to", "recompute_nll", "save_nll", "streaming_nll", "table"]
