"""Batched decoding of streams at different positions equals each stream decoding alone."""

import pytest
import torch

from endless.models.tiny import tiny_model
from endless.serve.batch import batchable, decode_step
from endless.stream import Stream, as_transformer


@pytest.mark.parametrize("policy", ["sinks:2+12", "window:10", "dense", "fam:4x1+2,firstres"])
def test_batched_decode_equals_alone(policy):
    model = as_transformer(tiny_model("llama", seed=3))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=g) for n in (3, 9, 17, 30)]  # past the window and blocks

    def streams():
        out = []
        for p in prompts:
            s = Stream(model, policy, chunk=8)
            s.feed(p, logprobs=False)
            out.append(s)
        return out

    alone, batched = streams(), streams()
    assert all(batchable(s) for s in batched)
    for _ in range(11):  # crosses several FAM blocks and ring wraps at different steps per stream
        tokens = [int(s.next_token()) for s in alone]
        expect = torch.cat([torch.log_softmax(s.last_logits, -1) for s in alone])
        got = torch.log_softmax(torch.cat([s.last_logits for s in batched]), -1)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
        for s, t in zip(alone, tokens, strict=True):
            s.feed(torch.tensor([t]), logprobs=False)
        decode_step(batched, tokens)
    assert [s.position for s in batched] == [s.position for s in alone]
    assert [s.state.t for s in batched] == [s.state.t for s in alone]


def test_one_model_only():
    a = Stream(as_transformer(tiny_model("llama", seed=1)), "sinks:2+12")
    b = Stream(as_transformer(tiny_model("llama", seed=1)), "sinks:2+12")
    with pytest.raises(ValueError, match="share one model"):
        decode_step([a, b], [1, 2])
