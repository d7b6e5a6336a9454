"""The per-machine kernel choice (endless.kernels): what is timed, what is kept, what is cached."""

import json

import pytest
import torch
import torch.nn.functional as F

from endless import kernels
from endless.models.tiny import tiny_model
from endless.packed import pack_linear
from endless.stream import Stream
from endless.transformer import Transformer


def ids_of(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_measure_times_every_candidate_and_keeps_an_exact_one():
    f32 = kernels.measure(Transformer(tiny_model("llama", seed=1)), rounds=3)
    assert set(f32.ms) == {"onednn", "transposed", "linear"} or set(f32.ms) == {"transposed", "linear"}
    assert f32.kernel == min(f32.ms, key=f32.ms.get)
    fastest = min(f32.chunk_ms, key=f32.chunk_ms.get)
    # a chunk kernel of its own only when it pays for the second copy of the weights
    split = f32.chunk_ms[f32.kernel] >= kernels.SPLIT_GAIN * f32.chunk_ms[fastest]
    assert f32.chunk_kernel == (fastest if split else f32.kernel)
    assert all(v > 0 for v in (*f32.ms.values(), *f32.chunk_ms.values()))
    bf16 = kernels.measure(Transformer(tiny_model("llama", seed=1).to(torch.bfloat16)), rounds=3)
    # int8 is timed (reported beside the others) but never chosen: it changes the results
    assert "int8" in bf16.ms and "int8" not in bf16.chunk_ms
    assert bf16.kernel in kernels.EAGER and "transposed" not in bf16.ms


def test_the_choice_is_cached_per_model_dtype_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path))
    model = Transformer(tiny_model("llama", seed=2))
    assert kernels.cached(model) is None
    first = kernels.choose(model)
    assert first.source == "measured"
    path = kernels.cache_file(model)
    assert path.parent == tmp_path / "kernels" and path.exists()
    again = kernels.choose(model)
    assert again.source == "cache" and (again.kernel, again.chunk_kernel, again.ms) == (first.kernel, first.chunk_kernel, first.ms)
    entry = json.loads(path.read_text())[first.key]
    assert entry["kernel"] == first.kernel and entry["version"] == kernels.VERSION
    # another thread count is another machine as far as the kernels go
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert kernels.cached(model) is None
    finally:
        torch.set_num_threads(threads)
    # another model (other weights) is measured on its own
    assert kernels.cached(Transformer(tiny_model("llama", seed=3))) is None


def test_an_unreadable_cache_is_measured_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path))
    model = Transformer(tiny_model("llama", seed=2))
    path = kernels.cache_file(model)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    choice = kernels.choose(model)
    assert choice.source == "measured" and "unreadable kernel cache" in caplog.text
    assert kernels.cached(model) is not None  # and the file is whole again


def test_a_stale_entry_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path))
    model = Transformer(tiny_model("llama", seed=2))
    key = kernels.choose(model).key
    path = kernels.cache_file(model)
    data = json.loads(path.read_text())
    data[key]["version"] = kernels.VERSION - 1
    path.write_text(json.dumps(data))
    assert kernels.cached(model) is None


@pytest.mark.parametrize("kernel", ["auto", "default", "onednn", "transposed", "linear"])
def test_every_kernel_gives_the_modules_results(kernel):
    hf = tiny_model("llama", seed=4, initializer_range=0.2)
    ids = ids_of(50)
    want = Stream(Transformer(hf), "sinks:4+20", chunk=7).feed(ids)
    model = Transformer(hf, pack=True, kernel=kernel)
    assert (model.kernel_choice is not None) == (kernel == "auto")
    got = Stream(model, "sinks:4+20", chunk=7).feed(ids)
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)
    if kernel in ("transposed", "linear"):
        assert model.packed.kernel == kernel


def test_a_token_and_a_chunk_can_run_different_kernels():
    w, b = torch.randn(48, 32), torch.randn(48)
    fn = pack_linear([w], [b], kernel="linear", chunk_kernel="transposed")
    assert fn.kernel == "linear/transposed"
    assert fn.nbytes == 2 * w.numel() * w.element_size()  # two copies: the price of the split
    for rows in (1, 5):
        x = torch.randn(rows, 32)
        assert torch.allclose(fn(x), F.linear(x, w, b), atol=1e-5)
    # the same kernel twice is one copy
    same = pack_linear([w], [b], kernel="linear", chunk_kernel="linear")
    assert same.kernel == "linear" and same.nbytes == w.numel() * w.element_size()


def test_a_measured_split_is_what_the_model_packs(tmp_path, monkeypatch):
    monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path))
    hf = tiny_model("llama", seed=6, initializer_range=0.2)
    model = Transformer(hf)
    choice = kernels.choose(model)
    # force a split into the cache, as a CPU where one row and many rows disagree would record it
    path = kernels.cache_file(model)
    data = json.loads(path.read_text())
    data[choice.key].update(kernel="linear", chunk_kernel="transposed")
    path.write_text(json.dumps(data))
    packed = Transformer(hf, pack=True)
    assert packed.kernel_choice.source == "cache" and packed.packed.kernel == "linear/transposed"
    ids = ids_of(40, seed=2)
    want = Stream(Transformer(hf), "sinks:4+16", chunk=9).feed(ids)
    assert torch.allclose(Stream(packed, "sinks:4+16", chunk=9).feed(ids), want, atol=1e-5, equal_nan=True)


def test_an_unknown_kernel_is_one_line():
    from endless.errors import EndlessError

    with pytest.raises(EndlessError, match="kernel must be auto or one of"):
        Transformer(tiny_model("llama", seed=1), pack=True, kernel="fastest")


def test_widened_bfloat16_is_f_linear_and_a_chunk_candidate():
    # "widened": bfloat16 weights multiplied in float32 (chunks on CPUs without native bfloat16 products)
    g = torch.Generator().manual_seed(7)
    w, b = (torch.randn(48, 32, generator=g) * 0.1).to(torch.bfloat16), torch.randn(48, generator=g).to(torch.bfloat16)
    fn = pack_linear([w], [b], kernel="linear", chunk_kernel="widened")
    assert fn.kernel == "linear/widened"
    assert fn.nbytes == w.numel() * w.element_size()  # both read the one fused weight: no second copy
    for rows in (1, 5):
        x = torch.randn(rows, 32, generator=g).to(torch.bfloat16)
        got, want = fn(x), F.linear(x.float(), w.float(), b.float())
        assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2)
    # float32 has nothing to widen: the default order serves instead
    assert pack_linear([w.float()], [b.float()], kernel="widened").kernel != "widened"
    # measured on chunks only (widening a weight for one row costs more than the row)
    choice = kernels.measure(Transformer(tiny_model("llama", seed=1).to(torch.bfloat16)), rounds=3)
    assert "widened" in choice.chunk_ms and "widened" not in choice.ms
    assert choice.kernel in kernels.EAGER and choice.chunk_kernel in kernels.EAGER + kernels.CHUNK_ONLY
