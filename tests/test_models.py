"""Loading paths, the cache, the supported-architecture check and bad input."""

import time

import pytest
import torch

from endless.errors import EndlessError
from endless.models import check_supported, load, model_identity
from endless.models.load import _embedded_gguf
from endless.models.tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_load_from_a_folder(family, tmp_path):
    m = tiny_model(family, seed=1)
    m.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 9))
    assert torch.allclose(m(ids).logits, again(ids).logits, atol=1e-6)


def test_identity_changes_with_weights():
    a, b = tiny_model(seed=1), tiny_model(seed=1)
    assert model_identity(a) == model_identity(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[-1, -1] += 1.0
    assert model_identity(a) != model_identity(b)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config

    with pytest.raises(EndlessError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        check_supported(GPT2Config())


def test_unsupported_folder(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(EndlessError, match="not supported"):
        load(str(tmp_path))


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: "no-such-model", "not an embedded name"),
        (lambda p: str(p / "missing.gguf"), "nor an existing path"),
        (lambda p: (p / "x.gguf").write_text("hello") and str(p / "x.gguf"), "not a GGUF file"),
        (lambda p: (p / "d").mkdir() or str(p / "d"), "without config.json"),
    ],
)
def test_bad_model_arguments(tmp_path, make, words):
    with pytest.raises(EndlessError, match=words):
        load(make(tmp_path))


def test_truncated_gguf_is_one_clear_error(tmp_path):
    try:
        src = _embedded_gguf("smollm2-135m")
    except EndlessError:
        pytest.skip("embedded model not installed")
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(EndlessError, match="cannot read"):
        load(str(bad))
    from endless.models import cache_dir

    assert not list(cache_dir().glob("models/cut-*"))  # nothing half-written left behind


@pytest.mark.real
def test_embedded_model_cached_load(real_model):
    model, tok = real_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    t = time.time()
    again, _ = load("smollm2-135m", dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    assert time.time() - t < 60  # generous: cached, never re-converted
    assert tok("hello").input_ids
