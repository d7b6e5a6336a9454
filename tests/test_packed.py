"""Packed inference weights (endless.packed) against transformers' own modules."""

import pytest
import torch

from endless.models.tiny import FAMILIES, tiny_model
from endless.stream import Stream
from endless.transformer import Transformer


def ids_of(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logprobs_equal_unpacked(family):
    hf = tiny_model(family, seed=1, initializer_range=0.2)
    ids = ids_of(60)
    want = Stream(Transformer(hf), "sinks:4+20", chunk=7).feed(ids)
    packed = Transformer(hf, pack=True)
    assert packed.packed is not None
    got = Stream(packed, "sinks:4+20", chunk=7).feed(ids)
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)


def test_packed_bfloat16_close_to_unpacked():
    hf = tiny_model("llama", seed=2).to(torch.bfloat16)
    ids = ids_of(40, seed=1)
    want = Stream(Transformer(hf), "sinks:4+20").feed(ids)
    got = Stream(Transformer(hf, pack=True), "sinks:4+20").feed(ids)
    assert (got - want)[:, 1:].abs().max().item() < 0.1


def test_one_row_rms_norm_equals_the_module_in_bfloat16():
    # a decoded token's norm runs as the layer norm of [x, -x]; it must round as the module does
    from endless.packed import fast_rms_norm

    hf = tiny_model("llama", seed=5).to(torch.bfloat16)
    module = hf.model.layers[0].input_layernorm
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
    norm = fast_rms_norm(module)
    assert norm is not None
    x = (torch.randn(200, 1, 1, module.weight.shape[0], generator=torch.Generator().manual_seed(1)) * 4).to(torch.bfloat16)
    with torch.no_grad():
        got = torch.cat([norm(r) for r in x]).float()
        want = module(x).float().flatten(0, 1)
    ulp = want.abs() * 2.0**-7  # one bfloat16 step at most, and nearly always none
    assert ((got - want).abs() <= ulp).all()
    assert (got == want).float().mean() > 0.99


def test_decode_equals_chunked_when_packed():
    model = Transformer(tiny_model("llama", seed=3, initializer_range=0.2), pack=True)
    ids = ids_of(50, seed=2)
    chunked = Stream(model, "sinks:4+20", chunk=16).feed(ids)
    s = Stream(model, "sinks:4+20", chunk=16)
    one = torch.cat([s.feed(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
    assert torch.allclose(chunked, one, atol=1e-5, equal_nan=True)


def test_edited_weights_fall_back_to_the_modules():
    hf = tiny_model("llama", seed=4)
    model = Transformer(hf, pack=True)
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.mul_(2.0)  # in place: the packed copy is stale now
    with torch.inference_mode():
        assert model._fast(0) is not None and model._fast(1) is None
    ids = ids_of(30, seed=3)
    got = Stream(model, "dense").feed(ids)
    want = Stream(Transformer(hf), "dense").feed(ids)
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)


def test_replaced_module_and_autograd_use_the_modules():
    hf = tiny_model("llama", seed=5)
    model = Transformer(hf, pack=True)
    old = hf.model.layers[0].self_attn.q_proj
    hf.model.layers[0].self_attn.q_proj = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    with torch.inference_mode():
        assert model._fast(0) is None and model._fast(1) is not None
    assert model._fast(1) is None  # autograd on: training and LoRA see transformers' modules


@pytest.mark.slow
def test_compiled_one_token_kernels_equal_the_packed_path():
    """endless.gemv: decoding (one row) runs the compiled kernels, chunks the packed ones; both
    give the unpacked logprobs. Compiles 5 tiny shapes (~10-30 s with a cold inductor cache)."""
    hf = tiny_model("llama", seed=6, initializer_range=0.2)
    model = Transformer(hf, pack=True, compile=True)
    n_layers = hf.config.num_hidden_layers
    if model.packed.compiled == 0:
        pytest.skip("TorchInductor cannot compile here (no C++ compiler?)")
    assert model.packed.compiled == 4 * n_layers + 1  # q/k/v, o, gate/up, down per layer and the head
    ids = ids_of(40, seed=4)
    want = Stream(Transformer(hf), "sinks:4+20", chunk=8).feed(ids)
    s = Stream(model, "sinks:4+20", chunk=8)
    got = torch.cat([s.feed(ids[:, :16])] + [s.feed(ids[:, i : i + 1]) for i in range(16, 40)], dim=1)
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)
    # a stale snapshot is never served: an edited layer falls back to its modules
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    want = Stream(Transformer(hf), "dense").feed(ids[:, :12])
    s = Stream(model, "dense")
    got = torch.cat([s.feed(ids[:, i : i + 1]) for i in range(12)], dim=1)
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)
