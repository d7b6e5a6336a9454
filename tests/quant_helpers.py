"""Shared by tests/test_int8.py and tests/test_int4.py: token ids and a bfloat16 tiny model whose
weights are large enough (std 0.2) for quantisation to show in the log-probs."""

from __future__ import annotations

import torch

from endless.models.tiny import tiny_model


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def bf16_model(seed: int = 2):
    return tiny_model("llama", seed=seed, initializer_range=0.2).to(torch.bfloat16)
