"""Our forward path equals transformers' forward on the same weights (the oracle of everything)."""

import pytest
import torch

from endless.models.tiny import tiny_model
from endless.policies.ring import RingKV
from endless.policies.spec import Dense
from endless.transformer import Transformer

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def dense_logits(model: Transformer, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    state = RingKV(model, Dense(), batch=ids.shape[0], chunk=chunk)
    return torch.cat([state.forward(ids[:, i : i + chunk]) for i in range(0, ids.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family):
    hf = tiny_model(family, seed=1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = dense_logits(Transformer(hf), ids, chunk=40)
    ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_equal_transformers():
    hf = tiny_model(
        "llama",
        seed=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    ids = torch.randint(0, hf.config.vocab_size, (1, 50))
    assert (dense_logits(Transformer(hf), ids, chunk=50) - hf(ids).logits).abs().max().item() <= 1e-4


def test_chunked_dense_equals_one_pass():
    model = Transformer(tiny_model("llama", seed=3))
    ids = torch.randint(0, 128, (1, 45))
    one = dense_logits(model, ids, chunk=45)
    for chunk in (1, 7, 16):
        assert (dense_logits(model, ids, chunk=chunk) - one).abs().max().item() <= 1e-5


def test_dense_buffer_grows_past_initial_capacity():
    model = Transformer(tiny_model("llama", seed=4, max_position_embeddings=4096))
    ids = torch.randint(0, 128, (1, 1100))
    state = RingKV(model, Dense(), chunk=550)
    out = torch.cat([state.forward(ids[:, :550]), state.forward(ids[:, 550:])], dim=1)
    assert state.capacity >= 1100
    ref = model.hf(ids).logits
    assert (out - ref).abs().max().item() <= 1e-4


def test_bfloat16_close_to_float32():
    hf = tiny_model("llama", seed=5)
    ids = torch.randint(0, 128, (1, 30))
    f32 = dense_logits(Transformer(hf), ids, chunk=30)
    bf = dense_logits(Transformer(hf.to(torch.bfloat16)), ids, chunk=30).float()
    assert (bf - f32).abs().max().item() < 0.1
