"""endless.hf: stock transformers ``generate`` with the sinks cache equals our Stream (the oracle)
token for token and logit for logit (docs/methods.md section 2; docs/methods.md section 4)."""

import pytest
import torch
from transformers import DynamicCache

from endless import hf
from endless.errors import EndlessError
from endless.models.tiny import tiny_model
from endless.stream import Stream

SPEC = "sinks:4+28"
ATOL = 1e-4


def make_model(family="llama", seed=0):
    # Trained length 64 < the 150+ tokens we generate; a larger init peaks the attention (wrong
    # positions show) and a 4x LM head separates the top logits (greedy ties cannot flip).
    m = tiny_model(family, seed=seed, max_position_embeddings=64, initializer_range=0.2)
    with torch.no_grad():
        m.lm_head.weight.mul_(4.0)
    m.generation_config.eos_token_id = None  # always generate max_new_tokens
    return m


@pytest.fixture(scope="module")
def model():
    return make_model()


def ids_of(n, seed=0, batch=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def oracle(stream, prompt, n):
    """Feed ``prompt`` to our Stream, then decode ``n`` greedy tokens: (tokens, logits (n, V))."""
    stream.feed(prompt, logprobs=False)
    toks, logits = [], []
    for _ in range(n):
        logits.append(stream.last_logits[0].clone())
        tok = stream.next_token()
        stream.feed(tok[:, None], logprobs=False)
        toks.append(int(tok))
    return toks, torch.stack(logits)


def generate(model, ids, cache, n, **kw):
    out = model.generate(
        ids,
        past_key_values=cache,
        do_sample=False,
        max_new_tokens=n,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack(out.logits)[:, 0]


def assert_separated(logits, margin=1e-3):
    top = logits.topk(2, dim=-1).values
    assert (top[:, 0] - top[:, 1]).min().item() > margin  # token equality is meaningful


@pytest.mark.parametrize("prompt_len,chunk", [(10, 128), (100, 128), (100, 16)])
def test_generate_equals_stream(model, prompt_len, chunk):
    """Short prompt: 150 tokens past the window and the trained length. Prompt of 100 > 4+28 in
    one forward call (chunk 16: processed in blocks inside that call)."""
    prompt = ids_of(prompt_len, seed=1)
    got, got_logits = generate(model, prompt, hf.streaming(model, SPEC, chunk=chunk), 150)
    want, want_logits = oracle(Stream(model, SPEC), prompt, 150)
    assert_separated(want_logits)
    assert got == want
    assert (got_logits - want_logits).abs().max().item() <= ATOL
    # Negative control: the window-only policy (no sinks) is far from these logits.
    _, window_logits = oracle(Stream(model, "window:32"), prompt, 150)
    assert (window_logits - want_logits).abs().max().item() > 1.0


def test_long_prompt_every_position_in_one_forward(model):
    ids = ids_of(100, seed=2)
    logits = model(ids, past_key_values=hf.streaming(model, SPEC)).logits.float()
    got = torch.log_softmax(logits, -1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    want = Stream(model, SPEC, chunk=1).feed(ids)[:, 1:]
    assert (got - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("mode", ["whole_conversation", "unread_tokens_with_mask"])
def test_second_turn_continues_the_cache(model, mode):
    p1, p2 = ids_of(40, seed=3), ids_of(20, seed=4)
    cache = hf.streaming(model, SPEC)
    first, _ = generate(model, p1, cache, 30)
    if mode == "whole_conversation":
        ids, kw = torch.cat([p1, torch.tensor([first]), p2], dim=1), {}
    else:  # generate's last token has not been read by the cache yet
        ids = torch.cat([torch.tensor([first[-1:]]), p2], dim=1)
        kw = {"attention_mask": torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long)}
    second, second_logits = generate(model, ids, cache, 60, **kw)
    stream = Stream(model, SPEC)
    want1, _ = oracle(stream, p1, 30)
    want2, want2_logits = oracle(stream, p2, 60)
    assert first == want1 and second == want2
    assert (second_logits - want2_logits).abs().max().item() <= ATOL
    assert cache.get_seq_length() == stream.position - 1 == 40 + 30 + 20 + 59


def buffers(cache):
    return [(x.shape, x.data_ptr()) for layer in cache.layers for x in (layer.keys, layer.values)]


def test_buffers_never_grow(model):
    cache = hf.streaming(model, SPEC)
    out = model.generate(ids_of(10, seed=5), past_key_values=cache, do_sample=False, max_new_tokens=50)
    before = buffers(cache)
    model.generate(out, past_key_values=cache, do_sample=False, max_new_tokens=250)
    after = buffers(cache)
    assert cache.get_seq_length() == 10 + 50 + 250 - 1
    assert before == after and before[0][0] == (1, 2, 4 + 28 + 128, 16)


def test_exact_at_a_million_tokens(model):
    """transformers rotates at position 10^6 with float32 angles (its dense logits move by ~0.7
    there; trusting them here would be off by ~0.4). The cache undoes that error: sinks and
    window at stream index 10^6 equal our float64 Stream."""
    ids = ids_of(60, seed=6)
    cache, stream = hf.streaming(model, SPEC), Stream(model, SPEC)
    model(ids[:, :4], past_key_values=cache)  # the 4 sinks
    stream.feed(ids[:, :4])
    for layer in cache.layers:
        layer.t = 1_000_000  # as if a million tokens had gone by
    stream.state.t = 1_000_000
    pos = torch.arange(1_000_000, 1_000_056)[None]
    logits = model(ids[:, 4:], past_key_values=cache, position_ids=pos).logits.float()
    got = torch.log_softmax(logits, -1)[:, :-1].gather(2, ids[:, 5:, None])[..., 0]
    want = stream.feed(ids[:, 4:])[:, 1:]
    assert (got - want).abs().max().item() <= ATOL


def test_unpadded_batch(model):
    prompt = ids_of(50, seed=7, batch=2)
    out = model.generate(prompt, past_key_values=hf.streaming(model, SPEC), do_sample=False, max_new_tokens=60)
    for b in range(2):
        assert out[b, 50:].tolist() == oracle(Stream(model, SPEC), prompt[b], 60)[0]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families(family):
    m = make_model(family)
    prompt = ids_of(40, seed=8)
    got, got_logits = generate(m, prompt, hf.streaming(m, SPEC), 80)
    want, want_logits = oracle(Stream(m, SPEC), prompt, 80)
    assert_separated(want_logits)
    assert got == want and (got_logits - want_logits).abs().max().item() <= ATOL


def test_other_caches_see_plain_sdpa():
    m = make_model()
    ids = ids_of(30, seed=9)
    want = m(ids, past_key_values=DynamicCache(config=m.config)).logits
    hf.enable(m)
    got = m(ids, past_key_values=DynamicCache(config=m.config)).logits
    assert torch.equal(got, want)


def test_mistakes_are_refused():
    m = make_model()
    with pytest.raises(EndlessError, match="streaming"):
        hf.SinkCache(m, SPEC)  # attention not switched
    hf.enable(m)
    for bad in ("window:32", "sinks:4+100", "sinks:4+28,sink=#7"):
        with pytest.raises(EndlessError):
            hf.SinkCache(m, bad)
    padded = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(EndlessError, match="unpadded"):
        m.generate(padded, attention_mask=mask, past_key_values=hf.streaming(m, SPEC), max_new_tokens=2)


@pytest.mark.real
def test_generate_on_the_embedded_model_equals_stream(real_model):
    """SmolLM2, a prompt longer than the window: transformers' generate == our runtime."""
    from endless import hf as endless_hf

    model, tok = real_model
    ids = tok("In the beginning God created the heaven and the earth. And the earth was without "
              "form, and void; and darkness was upon the face of the deep.", return_tensors="pt").input_ids
    stream = Stream(model, "sinks:4+20")
    stream.feed(ids, logprobs=False)
    ours = list(stream.generate(20))
    cache = endless_hf.streaming(model, "sinks:4+20")
    try:
        out = model.generate(ids, past_key_values=cache, do_sample=False, max_new_tokens=20,
                             attention_mask=torch.ones_like(ids))
    finally:
        model.set_attn_implementation("sdpa")
    assert out[0, ids.shape[1]:].tolist() == ours
