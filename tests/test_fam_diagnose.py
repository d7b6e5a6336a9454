"""The FAM memory diagnostics (endless.fam.diagnose) against direct computations."""

import random

import pytest
import torch

from endless.attention import gqa_scores
from endless.data.passkey import digit_example
from endless.fam import FamPrompt
from endless.fam.diagnose import _RecordingState, memory_report
from endless.fam.memory import fam_qkv, initial_fam
from endless.fam.state import FamState
from endless.models.tiny import tiny_model
from endless.policies.spec import parse_policy
from endless.rope import rotate
from endless.transformer import Transformer

POLICY = parse_policy("fam:8x1+4")


@pytest.fixture(scope="module")
def model():
    m = Transformer(tiny_model("llama", seed=0, initializer_range=0.2))
    m.fam_prompt = FamPrompt.neutral(m, POLICY.fam)
    return m


def ids_of(n, batch=2):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_recording_changes_nothing(model):
    ids = ids_of(40)
    plain, recording = FamState(model, POLICY, batch=2), _RecordingState(model, POLICY, batch=2)
    assert torch.equal(plain.forward(ids), recording.forward(ids))
    assert torch.equal(plain.fam, recording.fam)
    assert len(recording.shares) == 5 and all(len(row) == model.dims.n_layers for row in recording.shares)


@torch.no_grad()
def test_first_share_equals_the_attention_computed_directly(model):
    ids = ids_of(8)
    recording = _RecordingState(model, POLICY, batch=2)
    recording.forward(ids)
    # layer 0, first update: queries/keys of the initial FAM at -F..-1, keys of the embedded block at 0..7
    fam0 = initial_fam(model, model.fam_prompt)[0][None].expand(2, -1, -1)
    fq, fk, _ = fam_qkv(model, 0, fam0, torch.arange(-POLICY.fam, 0))
    _, k, _ = model.qkv(0, model.embed_tokens(ids))
    k = rotate(k, *model.rope.tables(torch.arange(8), model.dtype))
    probs = torch.softmax(gqa_scores(fq * model.scale, torch.cat([fk, k], dim=2)).float(), dim=-1)
    expected = probs[..., POLICY.fam :].sum(-1).mean().item()
    assert recording.shares[0][0] == pytest.approx(expected, abs=1e-6)
    assert 0.0 < expected < 1.0


def test_putting_back_the_state_the_stream_already_has_changes_no_answer(model):
    rng = random.Random(0)
    examples = [digit_example(60, 0.0, rng=rng, vocab=128) for _ in range(6)]
    cut = (59 // 8 - 1) * 8
    report = memory_report(model, POLICY, examples, short=cut, trained_updates=3)
    assert report["length"] == 60 and len(report["layers"]) == model.dims.n_layers
    assert report["all_layers_swapped"] == report["accuracy"]
    assert all(layer["swap_accuracy"] == report["accuracy"] for layer in report["layers"])
    assert all(0.0 < layer["block_share_trained"] < 1.0 for layer in report["layers"])


def test_bad_arguments_are_refused(model):
    rng = random.Random(0)
    examples = [digit_example(60, 0.0, rng=rng, vocab=128) for _ in range(2)]
    with pytest.raises(ValueError, match="multiple of 8"):
        memory_report(model, POLICY, examples, short=12, trained_updates=3)
    with pytest.raises(ValueError, match="F > 0"):
        memory_report(model, parse_policy("fam:8x1+0"), examples, short=16, trained_updates=3)
    with pytest.raises(ValueError, match="one length"):
        memory_report(model, POLICY, examples + [digit_example(61, 0.0, rng=rng, vocab=128)], short=16, trained_updates=3)
