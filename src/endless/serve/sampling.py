"""Choosing the next token and reporting log-probabilities, as the OpenAI API describes them.

``pick`` is greedy at temperature 0 and otherwise samples from the softmax at ``temperature``
restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling,
"The Curious Case of Neural Text Degeneration"). Draws use a host generator, so one ``seed``
gives the same reply on every device and whatever else is in the batch.
"""

from __future__ import annotations

import torch


def pick(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
         generator: torch.Generator | None = None) -> int:
    """The next token id from (V,) or (1, V) logits."""
    logits = logits.reshape(-1).float()
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep every token whose predecessors' mass is still below top_p (the first always)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_and_top(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the ``k`` most likely (id, log p), from (V,) or (1, V) logits."""
    lp = torch.log_softmax(logits.reshape(-1).float(), dim=-1)
    top = lp.topk(k) if k > 0 else None
    pairs = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]
    return float(lp[token]), pairs


__all__ = ["pick", "logprob_and_top"]
