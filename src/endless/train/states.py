"""Where a training sequence's FAM starts: the learned prompt, a passed state, or an unexplored one.

Shared by ``endless train fam`` and ``endless train fam-tiny``, so that both commands offer the
same recipe (docs/methods.md section 3, "Training"):

- random state passing ("TransformerFAM: Feedback attention is working memory", section 3): a
  sequence starts from the final FAM of a sequence of the previous step (``passed_state``);
- unexplored states ("Understanding and Improving Length Generalization in Recurrent Models",
  Buitrago Ruiz and Gu 2025, section 4): a sequence starts from an explored state, another
  sequence's final FAM or noise with the statistics of those (``unexplored_start``);
- truncated back-propagation over a long hold (*ours*): the start of a long sequence runs
  without gradient and its FAM starts the graded rest (``graded_cut``).
"""

from __future__ import annotations

import random

import torch

from endless.fam.memory import FamPrompt, initial_fam
from endless.transformer import Transformer

UNEXPLORED_SOURCES = ("batch", "noise")


def passed_state(carried: list[torch.Tensor], batch: int, shuffle: bool, rng: random.Random) -> list[torch.Tensor]:
    """Random state passing: the initial FAM of this step's ``batch`` sequences from the previous
    step's final FAMs (per layer (B', F, d)): the first sequence's for all (the paper's), or with
    ``shuffle`` each sequence that of a random previous sequence."""
    if not shuffle:
        return [s[:1].expand(batch, -1, -1) for s in carried]
    idx = torch.tensor([rng.randrange(carried[0].shape[0]) for _ in range(batch)], device=carried[0].device)
    return [s[idx] for s in carried]


def unexplored_start(model: Transformer, prompt: FamPrompt, last: list[torch.Tensor], p: float, source: str,
                     rng: random.Random, gen: torch.Generator) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Initial FAMs (per layer (B, F, d)) and the ``fresh`` rows for a batch trained from unexplored
    states: the model fails beyond the training length because it never saw the states a long
    stream reaches, and training from such initial states fixes it (Buitrago Ruiz and Gu, section 4).

    ``last`` is the previous step's final FAM of every sequence (detached). Each sequence starts,
    with probability ``p``, from a state of that batch (``source="batch"``: a permutation, so states
    chain over steps and reach histories far longer than one sequence, the gradient still stopping
    at the sequence's start; with one sequence per batch this is random state passing) or from
    Gaussian noise with the per-row, per-feature mean and std of those states (``"noise"``; with one
    sequence, the std of its rows); the others from the learned initial FAM (``fresh``, zero first
    residual). Returns (None, None) when no sequence was drawn.
    """
    bsz = last[0].shape[0]
    swap = torch.tensor([rng.random() < p for _ in range(bsz)], device=last[0].device)
    if not swap.any():
        return None, None
    if source == "noise":
        def draw(s: torch.Tensor) -> torch.Tensor:
            # one sequence has no spread over the batch: its rows' spread stands in
            mean, std = (s.mean(0), s.std(0)) if bsz > 1 else (s[0], s[0].std(0, keepdim=True).expand_as(s[0]))
            return mean + std * torch.randn(s.shape, generator=gen, dtype=s.dtype).to(s.device)
        src = [draw(s) for s in last]
    else:
        perm = torch.randperm(bsz, generator=gen).to(last[0].device)
        src = [s[perm] for s in last]
    start = initial_fam(model, prompt)
    init = [torch.where(swap[:, None, None], x, s0[None].expand(bsz, -1, -1).to(x.dtype))
            for x, s0 in zip(src, start, strict=True)]
    return init, ~swap


def graded_cut(length: int, grad_cap: int, block: int) -> int:
    """Tokens at the start of a ``length``-token sequence that run without gradient so that at most
    ``grad_cap`` (0: no cap) are back-propagated through: whole blocks, so the FAM they leave is the
    one the stream has at that point (0: nothing is cut)."""
    if not grad_cap or length <= grad_cap:
        return 0
    return (length - grad_cap + block - 1) // block * block


__all__ = ["UNEXPLORED_SOURCES", "passed_state", "unexplored_start", "graded_cut"]
