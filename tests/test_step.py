"""The compiled one-token step (endless.step) against the eager path it replaces.

Each compiled graph costs a few seconds on these tiny models (a C++ build), so the tests share a
handful of them; they skip where this machine cannot compile (no C++ compiler)."""

import shutil

import pytest
import torch

from endless.errors import EndlessError
from endless.models.tiny import tiny_model
from endless.stream import Stream
from endless.transformer import Transformer

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="the compiled step needs a C++ compiler")


def ids_of(n, *, batch=1, seed=0, vocab=128):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def decode(model, policy, ids, *, prompt=8, chunk=16):
    """Log-probs of a prompt fed as a chunk, then every later token fed one at a time."""
    s = Stream(model, policy, batch=ids.shape[0], chunk=chunk)
    out = [s.feed(ids[:, :prompt])]
    out += [s.feed(ids[:, i : i + 1]) for i in range(prompt, ids.shape[1])]
    return torch.cat(out, dim=1), s


@pytest.mark.parametrize(("family", "policy", "batch"), [("llama", "sinks:4+20", 1), ("qwen2", "window:24", 2),
                                                       ("qwen3", "bswa:8x2", 1)])
def test_compiled_step_equals_eager(family, policy, batch):
    # past the first eviction (sinks: the sink columns scored at S+W), young streams before it,
    # biases (qwen2), two streams in one batch, per-head norms (qwen3) and block-sliding windows
    hf = tiny_model(family, seed=3, initializer_range=0.2)
    ids = ids_of(70, batch=batch)
    want, _ = decode(Transformer(hf, pack=True), policy, ids)
    model = Transformer(hf, pack=True).compile_step()
    got, s = decode(model, policy, ids)
    assert len(model.step._graphs) == 1  # one graph served every decoded token
    assert torch.allclose(got, want, atol=1e-4, equal_nan=True)
    # and the state it left is the eager one: chunked scoring continues it identically
    more = ids_of(20, batch=batch, seed=1)
    ref = Stream(Transformer(hf, pack=True), policy, batch=batch, chunk=16)
    ref.feed(ids)
    assert torch.allclose(s.feed(more), ref.feed(more), atol=1e-4)


def test_compiled_step_bfloat16_close_to_eager():
    hf = tiny_model("llama", seed=4).to(torch.bfloat16)
    ids = ids_of(40, seed=2)
    want, _ = decode(Transformer(hf, pack=True), "sinks:4+12", ids)
    got, _ = decode(Transformer(hf, pack=True).compile_step(), "sinks:4+12", ids)
    assert (got - want)[:, 1:].abs().max().item() < 0.1


def test_graph_options_follow_this_cpu(monkeypatch):
    # float32 products are always autotuned; bfloat16 ones only where oneDNN has no bfloat16 path
    # (there the default graph falls to PyTorch's slow bfloat16 GEMM: endless.step's AUTOTUNE comment)
    import endless.step as step

    assert step.options(torch.float32)["max_autotune"]
    for native in (True, False):
        monkeypatch.setattr(step, "onednn_bfloat16", lambda native=native: native)
        got = step.options(torch.bfloat16)
        assert got["freezing"] and got.get("max_autotune", False) is (not native)
        # quantised weights never: autotuning replaced their kernels with templates that computed wrong logits
        assert not step.options(torch.bfloat16, "int8").get("max_autotune", False)


def test_compiled_step_zero_sink_equals_eager():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from endless.zero_sink import register

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    cfg.endless_zero_sink = True
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation=register(), dtype=torch.float32).eval()
    ids = ids_of(40, vocab=64)
    want, _ = decode(Transformer(hf, pack=True), "sinks:2+14", ids)
    model = Transformer(hf, pack=True).compile_step()
    assert model.zero_sink
    got, _ = decode(model, "sinks:2+14", ids)
    assert torch.allclose(got, want, atol=1e-4, equal_nan=True)


def test_edited_weights_fall_back_to_the_eager_path():
    # the graph holds a snapshot of the weights: once they change it must not serve
    hf = tiny_model("llama", seed=5, initializer_range=0.2)
    model = Transformer(hf, pack=True).compile_step()
    ids = ids_of(30, seed=3)
    decode(model, "sinks:4+12", ids)
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    got, s = decode(model, "sinks:4+12", ids)
    assert not model.step.serves(s.state)
    want, _ = decode(Transformer(hf), "sinks:4+12", ids)
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)


def test_dense_and_chunks_stay_eager():
    hf = tiny_model("llama", seed=6, initializer_range=0.2)
    model = Transformer(hf, pack=True).compile_step()
    s = Stream(model, "dense")
    assert not model.step.serves(s.state)  # a growing cache has no fixed shape to compile for
    assert model.step._graphs == {}


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_compiled_step_with_quantised_weights_equals_eager(weights):
    # the int8/int4 copies go through the same PyTorch kernels inside the graph
    hf = tiny_model("llama", seed=2, initializer_range=0.2).to(torch.bfloat16)
    ids = ids_of(40, seed=4)
    want, _ = decode(Transformer(hf, weights=weights), "sinks:4+12", ids)
    model = Transformer(hf, weights=weights).compile_step()
    got, _ = decode(model, "sinks:4+12", ids)
    assert len(model.step._graphs) == 1
    assert (got - want)[:, 1:].abs().max().item() < 0.1


def test_cuda_is_refused_in_one_line(monkeypatch):
    model = Transformer(tiny_model("llama", seed=0), pack=True)
    monkeypatch.setattr(Transformer, "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(EndlessError, match="CPU path"):
        model.compile_step()


def test_cli_refusal_is_one_line_and_exit_2(capsys):
    from endless.cli.main import main

    args = ["generate", "hi", "--compile-step", "--compile", "--dtype", "float32", "--threads", "1", "--model", "nope"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--compile-step replaces --compile" in err[0]


@pytest.mark.real
def test_compiled_step_on_the_embedded_model(real_model):
    # float32 SmolLM2: the compiled token equals the eager one, young and past the first eviction
    hf, tok = real_model
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :60]
    want, _ = decode(Transformer(hf, pack=True), "sinks:4+28", ids, prompt=20)
    model = Transformer(hf, pack=True).compile_step()
    got, _ = decode(model, "sinks:4+28", ids, prompt=20)
    assert len(model.step._graphs) == 1
    assert (got - want)[:, 1:].abs().max().item() <= 1e-4


def test_a_graph_that_fails_to_compile_falls_back_to_eager(monkeypatch, caplog):
    # a broken compiler or an unsupported build: one warning, then the eager path, nothing lost
    import endless.step as step_module

    def broken(*args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("C++ compile error\nmore lines")
        return call

    hf = tiny_model("llama", seed=7, initializer_range=0.2)
    ids = ids_of(30, seed=5)
    want, _ = decode(Transformer(hf, pack=True), "sinks:4+12", ids)
    model = Transformer(hf, pack=True).compile_step()
    monkeypatch.setattr(step_module.torch, "compile", broken)
    got, s = decode(model, "sinks:4+12", ids)
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)
    assert model.step.failed == "RuntimeError: C++ compile error" and not model.step.serves(s.state)
    assert sum("could not be built" in r.message for r in caplog.records) == 1
