"""The soak scaled down for CI (issue 24): 64k tokens of the embedded texts through one stream of a
tiny random model. What the million-token run on SmolLM2 measures (benchmarks/soak/) is checked
here on the quantities that do not depend on the model's quality: NLL finite at every token, the
state's size and the window's reach fixed from the first eviction on, RSS flat."""

from __future__ import annotations

import math

import pytest
import torch

from endless.bench.soak import SoakConfig, render, soak, soak_ids, targets
from endless.models.tiny import tiny_model
from endless.transformer import Transformer

TOKENS, SPAN, POLICY = 1 << 16, 1 << 13, "sinks:4+124"


@pytest.fixture(scope="module")
def result():
    model = Transformer(tiny_model("llama", seed=0))
    ids = soak_ids(None, model.dims.vocab, TOKENS, seed=0)
    return soak(model, ids, SoakConfig(tokens=TOKENS, policy=POLICY, span=SPAN, chunk=128))


def test_soak_ids_are_real_text_in_vocabulary_and_reproducible():
    a = soak_ids(None, 128, 5000, seed=3)
    b = soak_ids(None, 128, 5000, seed=3)
    assert a.shape == (5000,) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 128
    assert not torch.equal(a, soak_ids(None, 128, 5000, seed=4))  # the seed shuffles the sections


def test_every_nll_is_finite_over_64k_tokens(result):
    spans = result["spans"]
    assert sum(s["tokens"] for s in spans) == TOKENS - 1  # the first token has no prediction
    assert all(s["finite"] and s["nonfinite"] == 0 for s in spans)
    assert all(math.isfinite(s["ppl"]) for s in spans)


def test_state_size_and_window_reach_stay_bounded(result):
    spans = result["spans"]
    assert len({s["state_mb"] for s in spans}) == 1  # no growth: the same bytes from span 0 to the end
    assert {s["slots"] for s in spans} == {128 + 128}  # sinks + window + room for one chunk of 128
    # the oldest key held is at most W + chunk - 1 back (the mask narrows it to W): 124 + 127
    assert {s["window_reach"] for s in spans} == {124 + 127}


def test_rss_stays_flat(result):
    rss = [c["rss_mb"] for c in result["checkpoints"]]
    assert max(rss) - rss[0] < 8.0  # MB: allocator noise, not a state that grows with 64k tokens


def test_targets_and_render_name_every_check(result):
    rows = targets(result)
    assert [r["met"] for r in rows][2] is True  # finite NLL
    assert len(rows) == 4
    text = render({**result, "targets": rows})
    assert "NLL finite" in text and f"{TOKENS}" in text
