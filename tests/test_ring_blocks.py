"""The attention kernel scores long caches in query-row blocks (``SCORE_BLOCK``); blocking must not change
the numbers, for dense, window and sinks past S+W (where sink columns use a second query)."""

import pytest
import torch

import endless.attention as attention
from endless.models.tiny import tiny_model
from endless.stream import Stream
from endless.transformer import Transformer


@pytest.mark.parametrize("spec", ["dense", "window:24", "sinks:4+20"])
def test_row_blocks_give_the_same_logprobs(spec, monkeypatch):
    model = Transformer(tiny_model("llama", seed=0))
    ids = torch.randint(0, 128, (90,), generator=torch.Generator().manual_seed(0))
    whole = Stream(model, spec, chunk=30).feed(ids)
    monkeypatch.setattr(attention, "SCORE_BLOCK", 4 * 40 * 3)  # a few rows per block
    blocked = Stream(model, spec, chunk=30).feed(ids)
    assert torch.allclose(blocked, whole, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("spec", ["dense", "sinks:4+20"])
def test_per_head_products_give_the_same_logprobs(spec):
    # float32 with a thread count that does not divide B*KV runs one product per head
    model = Transformer(tiny_model("llama", seed=0))  # 2 KV heads
    ids = torch.randint(0, 128, (3, 60), generator=torch.Generator().manual_seed(1))  # B*KV = 6
    batched = Stream(model, spec, batch=3, chunk=30).feed(ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        per_head = Stream(model, spec, batch=3, chunk=30).feed(ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(per_head, batched, atol=1e-5, rtol=0, equal_nan=True)
