"""TransformerFAM against its oracles (docs/methods.md section 3; issue 6 tests)."""

import pytest
import torch

from endless.fam import FamPrompt, parallel_forward
from endless.models.tiny import tiny_model
from endless.policies.spec import parse_policy
from endless.stream import Stream
from endless.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_model("llama", seed=0, initializer_range=0.2))


def ids_of(n, seed=0, batch=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def lp_of(logits, ids):
    return torch.log_softmax(logits.float(), -1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]


@torch.no_grad()
def parallel_lp(model, ids, spec):
    pol = parse_policy(spec)
    return lp_of(parallel_forward(model, ids, pol, FamPrompt.neutral(model, getattr(pol, 'fam', 0))), ids)


@pytest.mark.parametrize("spec", ["fam:8x1+4", "fam:8x0+4", "fam:5x2+8", "fam:8x1+0", "fam:8x1+4,firstres",
                                  "fam:8x1+4,norm", "fam:8x1+4,null", "fam:8x1+4,null,gate",
                                  "fam:8x1+4,null,gate,skip0"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_streaming_equals_parallel(model, spec, chunk):
    ids = ids_of(45, seed=1, batch=2)
    got = Stream(model, spec, batch=2, chunk=chunk).feed(ids)[:, 1:]
    assert (got - parallel_lp(model, ids, spec)).abs().max().item() <= 1e-4


def test_first_residual_changes_only_what_follows_the_first_update(model):
    """``firstres`` keeps the initial FAM's residual on the first update: block 0 reads the same
    initial FAM either way, every later block reads a different one."""
    ids = ids_of(24, seed=3)
    zero, keep = parallel_lp(model, ids, "fam:8x1+4"), parallel_lp(model, ids, "fam:8x1+4,firstres")
    assert torch.equal(zero[:, :8], keep[:, :8])  # lp[j]: the logits at position j
    assert (zero[:, 8:] - keep[:, 8:]).abs().min().item() > 0


def test_null_slot_lets_the_update_attend_to_nothing(model):
    """``null``: the update's weights on the FAM and the block sum to less than one (the rest goes
    to a key 0 with value 0); block 0 reads the same initial FAM either way, later blocks differ."""
    from endless.attention import softmax_attention

    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 5, 16), torch.ones(2, 2, 5, 16)
    o_null, o_full = softmax_attention(q, k, v, null_slot=True), softmax_attention(q, k, v)
    assert torch.allclose(o_full, torch.ones_like(o_full)) and (o_null < 1).all() and (o_null > 0).all()
    ids = ids_of(24, seed=3)
    plain, null = parallel_lp(model, ids, "fam:8x1+4"), parallel_lp(model, ids, "fam:8x1+4,null")
    assert torch.equal(plain[:, :7], null[:, :7])  # lp[j]: the logits at position j; block 0 reads the prompt
    assert (plain[:, 8:] - null[:, 8:]).abs().max().item() > 1e-4
    assert parse_policy("fam:8x1+4,null").spec == "fam:8x1+4,null"


def test_gate_scales_the_update_ffn_by_the_attention_on_real_keys(model):
    """``gate``: each FAM row's FFN term is multiplied by its attention mass on real keys, so a row
    whose update attends only to the null slot stays exactly as it was."""
    from endless.errors import EndlessError
    from endless.fam.memory import fam_update

    pol = parse_policy("fam:8x1+4,null,gate")
    assert pol.spec == "fam:8x1+4,null,gate"
    for bad in ("fam:8x1+4,gate", "fam:8x1+4,null,gate,noffn"):
        with pytest.raises(EndlessError, match="gate"):
            parse_policy(bad)
    ids = ids_of(24, seed=3)
    assert (parallel_lp(model, ids, "fam:8x1+4,null") - parallel_lp(model, ids, spec=pol.spec))[:, 8:].abs().max() > 1e-5
    # an update whose every key scores far below the null slot's 0: the rows stay exactly as they were
    h, kv, d = model.dims.n_heads, model.dims.n_kv_heads, model.dims.head_dim
    fam = torch.randn(1, 4, model.dims.hidden)
    q, k_fam, k_block = torch.ones(1, h, 4, d), -100 * torch.ones(1, kv, 4, d), -100 * torch.ones(1, kv, 8, d)
    with torch.no_grad():
        kept = fam_update(model, 0, fam, q, k_fam, torch.randn(1, kv, 4, d), k_block, torch.randn(1, kv, 8, d),
                          first=False, policy=pol)
        moved = fam_update(model, 0, fam, q, k_fam, torch.randn(1, kv, 4, d), k_block, torch.randn(1, kv, 8, d),
                           first=False, policy=parse_policy("fam:8x1+4,null"))
    assert torch.equal(kept, fam) and not torch.allclose(moved, fam, atol=1e-3)


def test_skip0_keeps_layer_0_on_its_initial_fam(model):
    """``skip0``: layer 0's FAM is the prompt's initial one after any number of blocks, the layers
    above update as before."""
    from endless.fam.memory import initial_fam

    ids = ids_of(45, seed=2)
    s = Stream(model, "fam:8x1+4,skip0")
    s.feed(ids)
    init = initial_fam(model, s.state.prompt if hasattr(s.state, "prompt") else FamPrompt.neutral(model, 4))
    assert torch.equal(s.state.fam[0, 0], init[0].to(s.state.fam.dtype))
    assert not torch.allclose(s.state.fam[1, 0], init[1].to(s.state.fam.dtype))
    assert parse_policy("fam:8x1+4,skip0").spec == "fam:8x1+4,skip0"


def test_norm_keeps_every_fam_row_at_unit_rms(model):
    """``norm`` rescales each FAM row to unit RMS after every update, in both forms, however long
    the stream (without it the rows grow with the number of updates)."""
    ids = ids_of(80, seed=4)
    for spec in ("fam:8x1+4,norm", "fam:8x1+4"):
        pol = parse_policy(spec)
        _, state = parallel_forward(model, ids, pol, FamPrompt.neutral(model, 4), return_state=True)
        rms = torch.stack([s.pow(2).mean(-1).sqrt() for s in state])
        stream = Stream(model, spec)
        stream.feed(ids)
        srms = stream.state.fam.pow(2).mean(-1).sqrt()
        if spec.endswith("norm"):
            assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
            assert torch.allclose(srms, torch.ones_like(srms), atol=1e-4)
        else:
            assert (rms - 1).abs().max() > 0.1


def test_f0_equals_bswa_both_forms(model):
    ids = ids_of(50, seed=2)
    bswa_stream = Stream(model, "bswa:8x2").feed(ids)[:, 1:]
    assert torch.allclose(Stream(model, "fam:8x2+0").feed(ids)[:, 1:], bswa_stream, atol=1e-6)
    assert torch.allclose(parallel_lp(model, ids, "fam:8x2+0"), bswa_stream, atol=1e-4)
    assert torch.allclose(parallel_lp(model, ids, "bswa:8x2"), bswa_stream, atol=1e-4)


def test_bswa_with_window_over_the_whole_sequence_equals_dense(model):
    ids = ids_of(40, seed=3)
    dense = Stream(model, "dense").feed(ids)[:, 1:]
    assert torch.allclose(parallel_lp(model, ids, "bswa:8x4"), dense, atol=1e-4)
    assert torch.allclose(Stream(model, "bswa:8x4").feed(ids)[:, 1:], dense, atol=1e-5)


@pytest.mark.parametrize("spec", ["fam:8x1+4", "bswa:8x1"])
def test_causal_no_leak(model, spec):
    """Changing token t never changes outputs before t (so block t never sees a FAM built
    from itself)."""
    ids = ids_of(40, seed=4)
    a = Stream(model, spec).feed(ids)
    for t in (5, 8, 15, 16, 23):
        other = ids.clone()
        other[0, t] = (other[0, t] + 1) % 128
        b = Stream(model, spec).feed(other)
        assert torch.equal(a[:, :t].nan_to_num(), b[:, :t].nan_to_num())  # lp[t] is of token t
        assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])


def test_far_token_invisible_to_bswa_but_not_to_fam(model):
    """A token beyond BSWA's receptive field leaves its logits bit-identical; FAM's change."""
    ids = ids_of(64, seed=5)
    other = ids.clone()
    other[0, 2] = (other[0, 2] + 5) % 128
    # bswa:8x1 with 2 layers sees at most 2*(2*8) tokens back: token 2 is out of reach at 60+.
    b1 = Stream(model, "bswa:8x1").feed(ids)[:, 60:]
    b2 = Stream(model, "bswa:8x1").feed(other)[:, 60:]
    assert torch.equal(b1, b2)
    f1 = Stream(model, "fam:8x1+4").feed(ids)[:, 60:]
    f2 = Stream(model, "fam:8x1+4").feed(other)[:, 60:]
    assert (f1 - f2).abs().max().item() > 1e-4


def test_save_load_continue_equals_uninterrupted(model, tmp_path):
    ids = ids_of(60, seed=6)
    straight = Stream(model, "fam:8x1+4")
    whole = torch.cat([straight.feed(ids[:, :29]), straight.feed(ids[:, 29:])], dim=1)
    s = Stream(model, "fam:8x1+4")
    first = s.feed(ids[:, :29])
    s.save(tmp_path / "f.st")
    rest = Stream.load(tmp_path / "f.st", model).feed(ids[:, 29:])
    assert torch.equal(torch.cat([first, rest], dim=1).nan_to_num(), whole.nan_to_num())


def test_state_size_constant_over_a_long_stream(model):
    s = Stream(model, "fam:8x1+4", chunk=64)
    sizes = None
    for i in range(40):
        s.feed(ids_of(97, seed=i), logprobs=False)
        now = {k: (tuple(v.shape), v.data_ptr()) for k, v in s.state.state_tensors().items()}
        sizes = sizes or now
        assert now == sizes
    assert torch.isfinite(s.last_logits).all()


def test_gradients_flow_through_the_recurrence(model):
    """Training needs d(loss)/d(prompt) through every block's FAM update (and none with detach)."""
    ids = ids_of(40, seed=7)
    for spec, expect in (("fam:8x0+4", True), ("fam:8x0+4,detach", False)):
        pol = parse_policy(spec)
        prompt = FamPrompt.neutral(model, 4)
        logits = parallel_forward(model, ids, pol, prompt)
        logits[0, -1].sum().backward()
        assert (prompt.embeddings.grad is not None and prompt.embeddings.grad.abs().sum() > 0) == expect


@pytest.mark.parametrize("spec", ["fam:8x1+4", "fam:8x0+4", "fam:5x2+3", "fam:4x1+1,firstres", "fam:8x3+16"])
def test_both_forms_equal_the_spec_oracle(spec):
    """docs/methods.md section 3 written out on transformers' own modules (``naive_fam_logits``, no code
    of ours in its path) gives the same logits as the parallel and the streaming form."""
    from endless.reference import naive_fam_logits

    pol = parse_policy(spec)
    model = Transformer(tiny_model("llama", seed=0, initializer_range=0.2))
    prompt = FamPrompt(torch.randn(pol.fam, model.dims.hidden, generator=torch.Generator().manual_seed(5)))
    model.fam_prompt = prompt  # what the stream reads
    ids = ids_of(43, seed=6, batch=2)  # not a whole number of blocks
    want = naive_fam_logits(model.hf, ids, spec, prompt.embeddings)
    with torch.no_grad():
        par = parallel_forward(model, ids, pol, prompt)
    assert (par - want).abs().max().item() <= 1e-4
    stream = Stream(model, spec, batch=2, chunk=7)
    assert (stream.feed(ids)[:, 1:] - lp_of(want, ids)).abs().max().item() <= 1e-4


def test_replace_fam_with_its_own_rows_changes_nothing(model):
    """``FamState.replace_fam`` re-keys a FAM at the next block's positions: putting back a layer's
    own rows leaves the continuation bit-identical; mid-block it is refused."""
    ids = ids_of(40, seed=7)
    plain = Stream(model, "fam:8x1+4")
    plain.feed(ids[:, :32])
    want = plain.feed(ids[:, 32:])
    swapped = Stream(model, "fam:8x1+4")
    swapped.feed(ids[:, :32])
    swapped.state.replace_fam(1, swapped.state.fam[1].clone())
    assert torch.equal(swapped.feed(ids[:, 32:]), want)
    swapped.feed(ids[:, :3])
    with pytest.raises(ValueError, match="block boundary"):
        swapped.state.replace_fam(0, swapped.state.fam[0].clone())
