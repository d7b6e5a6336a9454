"""int4 weights (issue 21; endless.int4): groups of 32 against the dequantised reference, a stream
against bfloat16, chunked against token-by-token, the kernel's fallback and the refusals."""

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import bf16_model, ids_of

from endless.errors import EndlessError
from endless.int4 import CHUNK_ROWS, GROUP, dequantize, int4_linear, quantize
from endless.models.tiny import tiny_model
from endless.stream import Stream
from endless.transformer import Transformer


def test_quantize_takes_groups_of_32_within_half_a_step():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codes, scale, zero = quantize(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == zero.shape == (48, 64 // GROUP)
    step = scale.float().repeat_interleave(GROUP, dim=1)
    err = (dequantize(codes, scale, zero).float() - w.float()).abs()
    assert (err <= 0.51 * step + 1e-2 * w.float().abs()).all()  # nearest code, then the bf16 rounding
    # a weight already on the grid (a GGUF Q4_1 block using codes 0 and 15) comes back as it was
    on_grid = dequantize(codes, scale, zero)
    assert torch.equal(dequantize(*quantize(on_grid)), on_grid)


def test_inputs_not_in_groups_of_32_are_refused():
    with pytest.raises(ValueError, match="groups of 32"):
        quantize(torch.randn(8, 40))


@pytest.mark.parametrize("rows", [1, 5, CHUNK_ROWS, 40])  # the int4 kernel below CHUNK_ROWS, widened from it on
@pytest.mark.parametrize("shape", [(96, 64), (100, 64)])  # 100 outputs: a shape the kernel does not take
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_linear_equals_the_dequantised_reference(rows, shape, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(shape[0], generator=g).to(torch.bfloat16) if with_bias else None
    fn = int4_linear(w, bias)
    assert fn.kernel == ("int4" if shape[0] == 96 else "int4-widened")
    x = torch.randn(2, rows, shape[1], generator=g).to(torch.bfloat16)
    with torch.no_grad():
        got = fn(x).float()
    want = F.linear(x.float(), dequantize(*quantize(w)).float(), None if bias is None else bias.float())
    assert got.shape == (2, rows, shape[0])
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_int4_stream_close_to_bfloat16_and_fewer_bytes():
    hf = bf16_model()
    ids = ids_of(60)
    bf16 = Transformer(hf, pack=True)
    int4 = Transformer(hf, weights="int4")
    weights = sum(f.weight.numel() for layer in hf.model.layers for f in
                  (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)) + hf.lm_head.weight.numel()
    # 0.5 byte per weight streamed per token, 1 for the chunk copy, the group scales: < 1.8 of bfloat16's 2
    assert int4.packed.nbytes < 1.8 * weights and int4.packed.kernel == "int4/int8"  # the LM head stays int8
    want = Stream(bf16, "sinks:4+20", chunk=16).feed(ids)[:, 1:]
    got = Stream(int4, "sinks:4+20", chunk=16).feed(ids)[:, 1:]
    # 16 levels per group on a random model with weights of std 0.2 (not on a 4-bit grid, as the
    # embedded model's are): log-probs move several times int8's; measured mean 0.4, max 2.4
    assert (got - want).abs().mean() < 0.8
    assert abs(got.float().mean() - want.float().mean()) < 0.3


@pytest.mark.parametrize("chunk", [4, 64])  # 4: the int4 kernel as token-by-token; 64: the widened route
def test_int4_chunked_equals_token_by_token(chunk):
    model = Transformer(bf16_model(seed=3), weights="int4")
    ids = ids_of(70, seed=2)
    chunked = Stream(model, "sinks:4+20", chunk=chunk).feed(ids)
    s = Stream(model, "sinks:4+20", chunk=chunk)
    one = torch.cat([s.feed(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
    assert (chunked - one)[:, 1:].abs().max() < 0.25  # bfloat16 rounding, as packed bfloat16 against itself


def test_int4_needs_bfloat16_on_the_cpu(capsys):
    from endless.cli.main import main

    with pytest.raises(EndlessError, match="int4 weights run bfloat16"):
        Transformer(tiny_model("llama", seed=1), weights="int4")
    assert main(["eval", "ppl", "--weights", "int4", "--dtype", "float32", "--threads", "1", "--model", "tiny:llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bfloat16" in err
