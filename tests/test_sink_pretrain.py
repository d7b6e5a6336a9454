"""Pre-training with a sink (issue 23; "Efficient Streaming Language Models with Attention Sinks",
section 3.3): the zero sink against a naive softmax-off-by-one reference on our path, on
transformers' path and under every policy; three-step runs of each variant; the learnable sink
token in training and in evaluation."""

import json

import pytest
import torch

from endless.attention import off_by_one_softmax
from endless.zero_sink import ATTN_IMPLEMENTATION, naive_off_by_one, register, zero_sink_attention


def _tiny_zero_sink(zero: bool = True, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    cfg.endless_zero_sink = zero
    torch.manual_seed(seed)
    impl = register() if zero else "sdpa"
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32).eval()


def _naive_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """The model written out layer by layer, attention by ``naive_off_by_one`` (float64)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base, cfg = hf.model, hf.config
    d = cfg.hidden_size // cfg.num_attention_heads
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    x = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(x, torch.arange(ids.shape[1])[None])
    for layer in base.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        b, t, _ = h.shape
        q, k, v = (proj(h).view(b, t, -1, d).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        o = naive_off_by_one(q, k, v, d**-0.5).transpose(1, 2).reshape(b, t, -1)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return hf.lm_head(base.norm(x))


def test_off_by_one_softmax_is_softmax_with_a_zero_score():
    s = torch.randn(3, 5, 7) * 30
    s[0, 0, 2:] = float("-inf")
    ref = torch.softmax(torch.cat([s, torch.zeros(3, 5, 1)], -1).double(), -1)[..., :-1]
    torch.testing.assert_close(off_by_one_softmax(s).double(), ref, atol=1e-6, rtol=1e-5)


def test_registered_attention_equals_naive_reference():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    module = torch.nn.Module().eval()
    out, _ = zero_sink_attention(module, q, k, v, None, scaling=0.25)
    ref = naive_off_by_one(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_zero_sink_stream_equals_naive_and_transformers():
    from endless.stream import Stream, as_transformer

    hf = _tiny_zero_sink()
    assert hf.config._attn_implementation == ATTN_IMPLEMENTATION
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        naive = _naive_logits(hf, ids)
        torch.testing.assert_close(hf(ids).logits, naive, atol=1e-4, rtol=1e-4)
        model = as_transformer(hf)
        assert model.zero_sink
        lp = torch.log_softmax(naive[0].double(), -1)
        for spec in ("dense", "sinks:4+40", "window:40", "sinks:1+40"):  # the stream fits every window
            for chunk in (7, 40):
                got = Stream(model, spec, chunk=chunk).feed(ids[0])
                want = lp[torch.arange(39), ids[0, 1:]]
                torch.testing.assert_close(got[0, 1:].double(), want, atol=1e-4, rtol=1e-4)
        # the vanilla model of the same weights attends differently: the flag is what is tested
        plain = _tiny_zero_sink(zero=False)
        assert not as_transformer(plain).zero_sink
        assert (plain(ids).logits - naive).abs().max() > 1e-3


def test_zero_sink_one_token_path_equals_chunks():
    from endless.stream import Stream, as_transformer

    model = as_transformer(_tiny_zero_sink())
    ids = torch.randint(0, 64, (30,))
    with torch.no_grad():
        chunked = Stream(model, "sinks:2+8", chunk=16).feed(ids)
        s = Stream(model, "sinks:2+8", chunk=16)
        one = torch.cat([s.feed(ids[i : i + 1]) for i in range(30)], dim=1)
    torch.testing.assert_close(one, chunked, atol=1e-4, rtol=1e-4, equal_nan=True)  # token 0: no prediction


def test_zero_sink_stream_equals_naive_stream_past_eviction():
    """Under sinks:S+W and window:W far past the first eviction, the ring equals the token-by-token
    oracle that re-rotates every visible key (``endless.reference``), both off by one."""
    from endless.reference import naive_stream_logits
    from endless.stream import Stream, as_transformer

    model = as_transformer(_tiny_zero_sink(seed=1))
    ids = torch.randint(0, 64, (1, 36))
    with torch.no_grad():
        for spec in ("sinks:2+8", "sinks:1+9", "window:10"):
            want = torch.log_softmax(naive_stream_logits(model, ids, spec)[0].double(), -1)
            got = Stream(model, spec, chunk=6).feed(ids[0])
            torch.testing.assert_close(got[0, 1:].double(), want[torch.arange(35), ids[0, 1:]], atol=1e-4, rtol=1e-4)


def _tiny_cfg(variant):
    from endless.train.sink_pretrain import SinkConfig

    return SinkConfig(variant=variant, steps=3, batch=2, length=24, hidden=32, layers=1, heads=2, ffn=48, warmup=1)


@pytest.mark.parametrize("variant", ["vanilla", "zero-sink", "learnable-sink"])
def test_three_steps_give_a_loadable_folder(variant, tmp_path):
    import endless
    from endless.models import check_supported
    from endless.stream import as_transformer
    from endless.train.sink_pretrain import save, train

    texts = [torch.randint(3, 259, (500,)), torch.randint(3, 259, (300,))]
    run = train(_tiny_cfg(variant), progress=False, texts=texts)
    assert len(run.losses) == 3 and all(x == x for x in run.losses)
    folder = save(run, tmp_path / variant)
    hf, tok = endless.load(folder)
    check_supported(hf.config)
    assert tok is not None and tok("ab", add_special_tokens=False).input_ids == [ord("a") + 3, ord("b") + 3]
    assert as_transformer(hf).zero_sink == (variant == "zero-sink")
    assert (hf.config._attn_implementation == ATTN_IMPLEMENTATION) == (variant == "zero-sink")
    assert getattr(hf.config, "endless_sink_token", None) == (259 if variant == "learnable-sink" else None)
    torch.testing.assert_close(hf.model.embed_tokens.weight, run.model.model.embed_tokens.weight)
    meta = json.loads((folder / "sink_pretrain.json").read_text())
    assert meta["config"]["variant"] == variant and meta["steps"] == 3


def test_learnable_sink_token_is_prepended_in_training():
    from endless.train.sink_pretrain import build_model, lm_loss, make_tokenizer, sink_token_id

    tok = make_tokenizer()
    sink = sink_token_id(tok)
    assert sink == len(tok) - 1 == 259
    model = build_model(_tiny_cfg("learnable-sink"), len(tok))
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["input_ids"]),
                                    with_kwargs=True)
    ids = torch.randint(3, 259, (2, 24))
    lm_loss(model, ids, sink)
    assert seen[-1].shape == (2, 25) and (seen[-1][:, 0] == sink).all() and torch.equal(seen[-1][:, 1:], ids)
    lm_loss(model, ids, None)
    assert torch.equal(seen[-1], ids)


def test_eval_sinks_prepends_the_prefix_token(tmp_path):
    import endless
    from endless.cli.main import main
    from endless.eval.ppl import streaming_nll
    from endless.stream import as_transformer
    from endless.train.sink_pretrain import save, train

    run = train(_tiny_cfg("learnable-sink"), progress=False, texts=[torch.randint(3, 259, (400,))])
    folder = save(run, tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 4)
    out = tmp_path / "r.json"
    assert main(["eval", "sinks", "--model", str(folder), "--dtype", "float32", "--threads", "1", "--cache", "20",
                 "--no-recompute", "--text", str(text), "--tokens", "100", "--prefix-token", "259",
                 "--json", str(out)]) == 0
    res = {r["policy"]: r for r in json.loads(out.read_text())["results"]}
    assert json.loads(out.read_text())["prefix_token"] == 259
    hf, tok = endless.load(folder)
    ids = torch.tensor(tok(text.read_text()[:100], add_special_tokens=False).input_ids)
    with torch.no_grad():
        nll = streaming_nll(as_transformer(hf), torch.cat([torch.tensor([259]), ids]), "sinks:1+19")[1:]
    assert res["sinks:1+19"]["tokens"] == 99
    assert res["sinks:1+19"]["ppl"] == pytest.approx(float(nll.mean().exp()), rel=1e-4)
