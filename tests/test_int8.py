"""int8 weights (issue 21, part 2; endless.int8): the kernels against the dequantised reference,
a stream against bfloat16, chunked against token-by-token, and the refusals."""

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import bf16_model, ids_of

from endless.errors import EndlessError
from endless.int8 import CHUNK_ROWS, dequantize, int8_linear, quantize
from endless.models.tiny import tiny_model
from endless.stream import Stream
from endless.transformer import Transformer


def test_quantize_is_symmetric_per_channel_within_half_a_step():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    wq, scale = quantize(w)
    assert wq.dtype == torch.int8 and scale.shape == (48,) and wq.abs().max() <= 127
    err = (wq.float() * scale.float()[:, None] - w.float()).abs()  # before the product is rounded to bf16
    assert (err <= scale.float()[:, None] * 0.51 + 1e-6).all()  # round to nearest of the channel's step


@pytest.mark.parametrize("rows", [1, 5, CHUNK_ROWS, 70])  # int8pack below CHUNK_ROWS, widened from it on
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_equals_the_dequantised_reference(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 64, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16) if with_bias else None
    fn = int8_linear(w, bias)
    x = torch.randn(2, rows, 64, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        got = fn(x).float()
    want = F.linear(x.float(), dequantize(*quantize(w)).float(), None if bias is None else bias.float())
    assert got.shape == (2, rows, 96)
    # bfloat16 output rounding (2**-8 relative) plus float32-vs-bf16 accumulation
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_int8_weights_are_half_the_packed_bytes():
    hf = bf16_model()
    assert Transformer(hf, weights="int8").packed.nbytes < 0.55 * Transformer(hf, pack=True).packed.nbytes


def test_int8_stream_close_to_bfloat16():
    hf = bf16_model()
    ids = ids_of(60)
    want = Stream(Transformer(hf, pack=True), "sinks:4+20", chunk=16).feed(ids)[:, 1:]
    got = Stream(Transformer(hf, weights="int8"), "sinks:4+20", chunk=16).feed(ids)[:, 1:]
    # measured 0.20 on this tiny random model (initializer 0.2, 128-way vocabulary); the mean
    # NLL moves far less
    assert (got - want).abs().max() < 0.5
    assert abs(got.float().mean() - want.float().mean()) < 0.05


@pytest.mark.parametrize("chunk", [16, 64])  # 16: int8pack as token-by-token; 64: the widened route
def test_int8_chunked_equals_token_by_token(chunk):
    model = Transformer(bf16_model(seed=3), weights="int8")
    ids = ids_of(70, seed=2)
    chunked = Stream(model, "sinks:4+20", chunk=chunk).feed(ids)
    s = Stream(model, "sinks:4+20", chunk=chunk)
    one = torch.cat([s.feed(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
    # bfloat16 tolerance: packed bfloat16 (oneDNN) differs from its own token-by-token by as much
    assert (chunked - one)[:, 1:].abs().max() < 0.25


def test_int8_weights_are_not_used_with_autograd():
    # the same contract as packing: training and LoRA see transformers' modules, exactly
    hf = bf16_model()
    model = Transformer(hf, weights="int8")
    x = model.embed_tokens(ids_of(5))
    with torch.no_grad():
        assert model._fast(0) is not None
        fast = model.finish(0, x, model.qkv(0, x)[0])
    slow = model.finish(0, x, model.qkv(0, x)[0])  # autograd on
    exact = Transformer(hf).finish(0, x, Transformer(hf).qkv(0, x)[0])
    assert model._fast(0) is None and slow.requires_grad
    assert torch.equal(slow, exact) and not torch.equal(fast, exact)


def test_int8_needs_bfloat16():
    with pytest.raises(EndlessError, match="bfloat16"):
        Transformer(tiny_model("llama", seed=1), weights="int8")


def test_int8_with_float32_is_one_line_and_exit_2(capsys):
    from endless.cli.main import main

    assert main(["eval", "ppl", "--weights", "int8", "--dtype", "float32", "--threads", "1", "--model", "tiny:llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bfloat16" in err


def test_verify_reports_the_int8_distance():
    from endless.verify import verify_int8

    model = Transformer(tiny_model("llama", seed=4, initializer_range=0.2))
    rows = {v.check: v for v in verify_int8(model, ids_of(24))}
    assert set(rows) == {"bfloat16", "int8", "int4"}
    assert 0 < rows["bfloat16"].max_abs_diff < rows["int8"].max_abs_diff < rows["int8"].tolerance
    assert rows["int8"].max_abs_diff < rows["int4"].max_abs_diff < rows["int4"].tolerance


def test_bench_int8_needs_bfloat16(capsys):
    from endless.cli.main import main

    assert main(["bench", "--quick", "--weights", "int8", "--dtype", "float32", "--model", "tiny:llama"]) == 2
    assert "bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_int8_chunks_widen_to_what_this_cpu_multiplies_fast(monkeypatch, native):
    # without oneDNN's bfloat16 path (AVX2) chunks widen the int8 weight to float32, else to bfloat16
    import endless.int8

    monkeypatch.setattr(endless.int8, "onednn_bfloat16", lambda: native)
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(96, 64, generator=g) * 0.05).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(CHUNK_ROWS + 3, 64, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        got = int8_linear(w, bias)(x)
    want = F.linear(x.float(), dequantize(*quantize(w)).float(), bias.float())
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= 2e-2 * want.abs().max()
