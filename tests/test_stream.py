"""The streaming engine against its oracles (docs/methods.md section 2; docs/methods.md section 4)."""

import pytest
import torch

from endless.errors import EndlessError
from endless.models.tiny import tiny_model
from endless.reference import naive_stream_logits
from endless.stream import Stream
from endless.transformer import Transformer

POLICIES = ["window:24", "sinks:4+20", "sinks:2+22,sink=#7", "bswa:8x2", "recompute:24"]


@pytest.fixture(scope="module")
def model():
    # A larger init makes the random model's attention peaked, so wrong positions show.
    return Transformer(tiny_model("llama", seed=0, initializer_range=0.2))


def ids_of(n, seed=0, batch=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def logprobs_from_logits(logits, ids):
    lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    return lp


def test_first_token_has_no_logprob_then_values_are_finite(model):
    lp = Stream(model, "sinks:4+20").feed(ids_of(10))
    assert torch.isnan(lp[0, 0]) and torch.isfinite(lp[0, 1:]).all()


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_equals_dense_while_the_stream_fits(model, policy):
    n = 23  # every policy above sees all of them (with the 2 sink copies: 25)
    ids = ids_of(n, seed=1)
    got = Stream(model, policy, chunk=5).feed(ids)
    want = Stream(model, "dense").feed(ids)
    if "sink=" in policy:  # the sink copies are a prefix the dense stream must see too
        pre = torch.full((1, 2), 7)
        want = Stream(model, "dense").feed(torch.cat([pre, ids], dim=1))[:, 2:]
        got, want = got[:, 1:], want[:, 1:]
    assert torch.allclose(got, want, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("policy", ["sinks:4+20", "window:24", "bswa:8x2", "sinks:2+22,sink=#7"])
def test_equals_naive_reference_at_every_step(model, policy):
    ids = ids_of(80, seed=2)  # > 3x the window
    ref = logprobs_from_logits(naive_stream_logits(model, ids, policy), ids)
    got = Stream(model, policy, chunk=1).feed(ids)[:, 1:]
    assert (got - ref).abs().max().item() <= 1e-4


def test_sink_positions_matter(model):
    """Negative control: the oracle distinguishes sinks from window and the sink token variant."""
    ids = ids_of(80, seed=2)
    a = Stream(model, "sinks:4+20").feed(ids)[:, 30:]
    b = Stream(model, "window:24").feed(ids)[:, 30:]
    c = Stream(model, "sinks:4+20,sink=#7").feed(ids)[:, 30:]
    assert (a - b).abs().max() > 1e-2 and (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("policy", POLICIES + ["dense"])
def test_chunked_equals_token_by_token(model, policy):
    ids = ids_of(90, seed=3)
    one = Stream(model, policy, chunk=1).feed(ids)
    for chunk in (7, 24, 72):  # 1, 7, W and 3W
        got = Stream(model, policy, chunk=chunk).feed(ids)
        assert torch.allclose(got, one, atol=1e-4, equal_nan=True), chunk
    # Uneven feeds through one stream agree too.
    s = Stream(model, policy, chunk=7)
    parts = [s.feed(ids[:, a:b]) for a, b in [(0, 3), (3, 40), (40, 41), (41, 90)]]
    assert torch.allclose(torch.cat(parts, dim=1), one, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("pack", [False, True])
def test_bfloat16_chunks_write_the_keys_token_by_token_writes(pack):
    # both paths rotate in float32 and round once, so the cache is the same bit for bit -- given the
    # same products: the kernel is pinned, because a measured choice may give chunks a kernel of their
    # own (bfloat16 on an AVX2-only CPU: "widened", float32 sums in another order), which rounds the
    # projections apart by an ulp now and then
    hf = tiny_model("llama", seed=3, initializer_range=0.2).to(torch.bfloat16)
    m = Transformer(hf, pack=pack, kernel="default")
    ids = ids_of(40, seed=5)
    chunked, single = Stream(m, "sinks:4+20", chunk=16), Stream(m, "sinks:4+20", chunk=16)
    chunked.feed(ids)
    for i in range(ids.shape[1]):
        single.feed(ids[:, i : i + 1])
    assert torch.equal(chunked.state.k, single.state.k)
    assert torch.equal(chunked.state.v, single.state.v)


@pytest.mark.parametrize("policy", POLICIES + ["dense"])
def test_batch_equals_single_streams(model, policy):
    ids = ids_of(50, seed=4, batch=3)
    both = Stream(model, policy, batch=3, chunk=16).feed(ids)
    # and one token at a time (the one-token path; past S+W it scores sinks in interleaved rows)
    s = Stream(model, policy, batch=3, chunk=16)
    stepped = torch.cat([s.feed(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
    for b in range(3):
        single = Stream(model, policy, chunk=16).feed(ids[b])
        assert torch.allclose(both[b : b + 1], single, atol=1e-5, equal_nan=True)
        assert torch.allclose(stepped[b : b + 1], single, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("policy", POLICIES + ["dense"])
def test_save_load_continue_equals_uninterrupted(model, policy, tmp_path):
    ids = ids_of(70, seed=5)
    straight = Stream(model, policy, chunk=8)
    whole = torch.cat([straight.feed(ids[:, :33]), straight.feed(ids[:, 33:])], dim=1)
    s = Stream(model, policy, chunk=8)
    first = s.feed(ids[:, :33])
    s.save(tmp_path / "s.safetensors")
    resumed = Stream.load(tmp_path / "s.safetensors", model)
    rest = resumed.feed(ids[:, 33:])
    assert resumed.position == 70
    assert torch.equal(torch.cat([first, rest], dim=1).nan_to_num(), whole.nan_to_num())


def test_generate_after_load_equals_uninterrupted(model, tmp_path):
    s = Stream(model, "sinks:4+20")
    s.feed(ids_of(30, seed=6))
    s.save(tmp_path / "g.st")
    a = list(s.generate(40))
    b = list(Stream.load(tmp_path / "g.st", model).generate(40))
    assert a == b and len(a) == 40


def test_bad_state_files_are_refused_and_nothing_is_overwritten(model, tmp_path):
    path = tmp_path / "s.st"
    s = Stream(model, "sinks:4+20")
    s.feed(ids_of(30))
    s.save(path)
    good = path.read_bytes()
    with pytest.raises(EndlessError, match="another model"):
        Stream.load(path, Transformer(tiny_model("llama", seed=9)))
    with pytest.raises(EndlessError, match="another policy \\(sinks:4\\+20 vs window:24\\)"):
        Stream.load(path, model, policy="window:24")
    (tmp_path / "trunc.st").write_bytes(good[: len(good) // 2])
    with pytest.raises(EndlessError, match="not a readable"):
        Stream.load(tmp_path / "trunc.st", model)
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    (tmp_path / "flip.st").write_bytes(bytes(flipped))
    with pytest.raises(EndlessError, match="checksum"):
        Stream.load(tmp_path / "flip.st", model)
    with pytest.raises(EndlessError, match="no saved stream"):
        Stream.load(tmp_path / "missing.st", model)
    assert path.read_bytes() == good


def test_buffers_constant_over_100k_tokens(model):
    s = Stream(model, "sinks:4+60", chunk=500)
    shapes = None
    for i in range(200):
        s.feed(ids_of(500, seed=i), logprobs=False)
        now = [tuple(t.shape) for t in s.state.state_tensors().values()]
        ptrs = [t.data_ptr() for t in s.state.state_tensors().values()]
        if shapes is None:
            shapes, first_ptrs = now, ptrs
        assert now == shapes and ptrs == first_ptrs
    assert s.position == 100_000
    assert torch.isfinite(s.last_logits).all()


def test_positions_exact_at_a_million(model):
    """Shifting every position by 10^6 leaves window attention unchanged (float64 angles)."""
    ids = ids_of(60, seed=7)
    a = Stream(model, "window:24", chunk=16)
    b = Stream(model, "window:24", chunk=16)
    b.state.t = 1_000_000  # as if a million tokens had gone by
    assert (a.feed(ids)[:, 1:] - b.feed(ids)[:, 1:]).abs().max().item() <= 1e-4


def test_generate_greedy_is_deterministic_and_long(model):
    s = Stream(model, "sinks:4+20")
    s.feed(ids_of(5))
    toks = list(s.generate(300))  # far past the tiny model's 256 trained positions
    assert len(toks) == 300 and s.position == 305
    assert s.state.capacity == 4 + 20 + 128


def test_token_logprobs_in_row_blocks_equal_the_whole_log_softmax():
    """Blocks of LOGPROB_ROWS rows, any logits dtype, float32 out: the whole log-softmax's values."""
    from endless.stream import LOGPROB_ROWS, token_logprobs

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3 * LOGPROB_ROWS + 5, 50, generator=gen) * 4
    targets = torch.randint(0, 50, logits.shape[:2], generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        want = torch.log_softmax(x.float(), dim=-1).gather(2, targets[..., None])[..., 0]
        got = token_logprobs(x, targets)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffered_chunk_attention_equals_the_autograd_path(dtype, monkeypatch):
    """Chunks under inference use reused score buffers; with gradients the plain tensors: the
    same scores (sinks past S+W included), one rounding of the probabilities apart at most."""
    from endless.attention import Kernel

    m = Transformer(tiny_model("llama", seed=0, initializer_range=0.2).to(dtype))
    ids = ids_of(70, seed=3)
    want = Stream(m, "sinks:4+20", chunk=16).feed(ids)  # inference: the buffers
    plain, original = [], Kernel._plain
    monkeypatch.setattr(Kernel, "_plain", lambda self, *a: plain.append(1) or original(self, *a))
    s = Stream(m, "sinks:4+20", chunk=16)
    with torch.enable_grad():
        for p in m.hf.parameters():
            p.requires_grad_(True)
        try:
            got = torch.cat([s.state.forward(ids[:, lo : lo + 16]).detach() for lo in range(0, 70, 16)], dim=1)
        finally:
            for p in m.hf.parameters():
                p.requires_grad_(False)
    assert len(plain) == 5 * m.dims.n_layers  # every chunk of every layer took the autograd path
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logprobs_from_logits(got, ids), want[:, 1:], rtol=0, atol=tol)
