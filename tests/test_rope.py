"""RoPE tables: float64 angles, exact relative property, bounded error at huge positions."""

import math

import torch

from endless.rope import Rope, rotate


def test_scores_depend_only_on_distance_even_at_a_million():
    rope = Rope(1.0 / (1e5 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)))
    q = torch.randn(1, 1, 1, 64, dtype=torch.float32)
    k = torch.randn(1, 1, 1, 64, dtype=torch.float32)

    def score(pq, pk):
        cq, sq = rope.tables(torch.tensor([pq]), torch.float32)
        ck, sk = rope.tables(torch.tensor([pk]), torch.float32)
        return (rotate(q, cq, sq) * rotate(k, ck, sk)).sum().item()

    near = score(1000, 990)
    far = score(1_000_000 + 1000, 1_000_000 + 990)
    assert abs(near - far) < 1e-4


def test_float64_angles_match_closed_form():
    inv = torch.tensor([1.0, 0.5], dtype=torch.float64)
    cos, sin = Rope(inv).tables(torch.tensor([3_000_000]), torch.float64)
    assert math.isclose(cos[0, 0].item(), math.cos(3_000_000.0), abs_tol=1e-9)
    assert math.isclose(sin[0, 1].item(), math.sin(1_500_000.0), abs_tol=1e-9)
