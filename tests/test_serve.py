"""endless serve against the real ``openai`` client on 127.0.0.1.

Most tests run a random 2-layer llama with SmolLM2's vocabulary (fast) and the embedded model's
tokenizer and chat template: they need the embedded model's files, hence the ``real`` marker. One
test runs SmolLM2 itself. Replies are greedy, so a conversation's reply is a function of its
transcript: a session resumed, re-fed or decoded in a batch must give the same one.
"""

from __future__ import annotations

import shutil
import threading

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
try:  # the HTTP client the openai package is built on (httpx, or its successor httpx2)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from serve_helpers import running, smollm2_tokenizer, tiny_chat_model  # noqa: E402

from endless.policies.spec import Sinks, parse_policy  # noqa: E402
from endless.serve.app import create_app  # noqa: E402
from endless.serve.engine import Engine  # noqa: E402
from endless.serve.protocol import Limits  # noqa: E402

pytestmark = pytest.mark.real

KEY = "test-key"
SYSTEM = {"role": "system", "content": "You are terse."}


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model()


def serve(model, tok, policy="sinks:prefix+64", *, key=KEY, limits=None, **kw):
    engine = Engine(model, tok, parse_policy(policy), model_name="tiny", **kw)
    return engine, running(create_app(engine, api_key=key, limits=limits))


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(c, messages, cid=None, **kw):
    kw.setdefault("max_tokens", 6)
    extra = {"conversation_id": cid} if cid else None
    r = c.chat.completions.create(model="tiny", messages=messages, temperature=0, extra_body=extra, **kw)
    return r.choices[0].message.content, r.usage


def test_chat_with_and_without_streaming_and_the_other_routes(model, tok):
    engine, server = serve(model, tok)
    with server as url:
        c = client(url)
        msgs = [SYSTEM, {"role": "user", "content": "Hello"}]
        text, usage = ask(c, msgs, max_tokens=7)
        assert usage.completion_tokens == 7 and usage.fed_tokens == usage.prompt_tokens
        pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(
            model="tiny", messages=msgs, temperature=0, max_tokens=7, stream=True) if ch.choices]
        assert "".join(p for p in pieces if p) == text and len(pieces) > 2  # streamed in pieces
        assert [m.id for m in c.models.list()] == ["tiny"]
        assert httpx.get(url + "/health").json()["status"] == "ok"
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert "endless_tokens_per_second" in metrics and "endless_live_sessions 0" in metrics
        assert "endless_queue_length 0" in metrics
        page = httpx.get(url + "/").text  # the chat page's wiring: the route it posts to, SSE, the kept session
        for needle in ("/v1/chat/completions", "stream: true", "conversation_id", "localStorage", "[DONE]"):
            assert needle in page


def test_turns_feed_only_new_tokens_and_a_changed_history_is_refed(model, tok):
    engine, server = serve(model, tok)
    with server as url:
        c = client(url)
        msgs = [SYSTEM, {"role": "user", "content": "First question"}]
        first_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        expect_new = len(tok(first_prompt, add_special_tokens=False).input_ids)
        pinned = engine._pinned(msgs)
        before = 0
        for turn in range(3):
            text, usage = ask(c, msgs, "conv-1")
            # turn 1 reads the whole prompt; later turns only the new user message and the headers
            # around it: the history is not read again
            assert usage.fed_tokens == expect_new and not usage.refed
            assert usage.prompt_tokens_details.cached_tokens == before
            before = usage.session_tokens
            msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": f"Question {turn + 2}"}]
            full = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            expect_new = len(tok(full[engine.store.live["conv-1"].chars :], add_special_tokens=False).input_ids)
            assert 0 < expect_new < 25
        # the pinned system prompt and header are the stream's sinks
        s = engine.store.live["conv-1"].stream
        assert s.policy == Sinks(len(tok(pinned, add_special_tokens=False).input_ids), 64)
        # a history that disagrees (an edited earlier message) is read again from the start ...
        edited = [dict(m) for m in msgs]
        edited[1]["content"] = "First question, edited"
        text_edit, usage = ask(c, edited, "conv-1")
        assert usage.refed and usage.prompt_tokens_details.cached_tokens == 0
        assert usage.fed_tokens == len(tok(tok.apply_chat_template(edited, tokenize=False, add_generation_prompt=True),
                                           add_special_tokens=False).input_ids)
        # ... and answers exactly as a new conversation with that history would
        assert ask(c, edited, "conv-2")[0] == text_edit
        assert ask(c, edited)[0] == text_edit  # no id: a one-off stream


def test_long_conversation_stays_in_the_window(model, tok):
    """20k tokens through one conversation: the state's buffers never grow."""
    engine, server = serve(model, tok, "sinks:prefix+256")
    with server as url:
        c = client(url)
        msgs = [SYSTEM]
        words = " ".join(f"w{i}" for i in range(600))  # ~1.2k tokens a turn
        sizes = set()
        usage = None
        while usage is None or usage.session_tokens < 20_000:
            msgs.append({"role": "user", "content": words})
            text, usage = ask(c, msgs, "long", max_tokens=2)
            assert not usage.refed and (len(msgs) == 2 or usage.prompt_tokens_details.cached_tokens > 0)
            msgs.append({"role": "assistant", "content": text})
            state = engine.store.live["long"].stream.state
            sizes.add(sum(t.numel() * t.element_size() for t in state.state_tensors().values()))
        assert usage.session_tokens >= 20_000
        assert len(sizes) == 1  # constant memory: sinks + 256 + one chunk of slots, from the first turn to the last
        assert state.capacity == state.n_sinks + 256 + engine.chunk


def test_restart_resumes_sessions(model, tok, tmp_path):
    msgs = [SYSTEM, {"role": "user", "content": "Remember me"}]
    engine, server = serve(model, tok, sessions_dir=tmp_path)
    with server as url:
        text, _ = ask(client(url), msgs, "kept")
    assert (tmp_path / "kept.st").is_file()  # saved when idle or at shut-down, atomically
    msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "Again"}]
    engine, server = serve(model, tok, sessions_dir=tmp_path)
    with server as url:
        c = client(url)
        text2, usage = ask(c, msgs, "kept")
        assert engine.store.resumed == 1 and not usage.refed and usage.prompt_tokens_details.cached_tokens > 0
        assert usage.fed_tokens < 20
        assert ask(c, msgs, "control")[0] == text2  # the resumed state is the uninterrupted one
    # a damaged file is not trusted: the transcript is read again
    data = bytearray((tmp_path / "kept.st").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "kept.st").write_bytes(bytes(data))
    msgs += [{"role": "assistant", "content": text2}, {"role": "user", "content": "Third"}]
    engine, server = serve(model, tok, sessions_dir=tmp_path)
    with server as url:
        c = client(url)
        text3, usage = ask(c, msgs, "kept")
        assert engine.store.resumed == 0 and usage.prompt_tokens_details.cached_tokens == 0
        assert ask(c, msgs, "control2")[0] == text3
    # another policy refuses the saved state the same way
    engine, server = serve(model, tok, "sinks:prefix+128", sessions_dir=tmp_path)
    with server as url:
        _, usage = ask(client(url), msgs, "kept")
        assert engine.store.resumed == 0 and usage.prompt_tokens_details.cached_tokens == 0


def test_lru_bounds_live_sessions(model, tok, tmp_path):
    engine, server = serve(model, tok, sessions_dir=tmp_path, max_sessions=2, max_batch=2)
    with server as url:
        c = client(url)
        msgs = [{"role": "user", "content": "hi"}]
        first = [ask(c, msgs, f"s{i}")[0] for i in range(4)]
        assert len(engine.store.live) == 2 and len(list(tmp_path.glob("*.st"))) >= 2
        text, usage = ask(c, msgs + [{"role": "assistant", "content": first[0]}, {"role": "user", "content": "x"}], "s0")
        assert usage.prompt_tokens_details.cached_tokens > 0  # s0 came back from its file


def test_concurrent_conversations_decode_together_and_equal_alone(model, tok):
    engine, server = serve(model, tok, max_batch=8)
    with server as url:
        c = client(url)
        convs = {f"c{i}": [SYSTEM, {"role": "user", "content": "x " * (1 + 7 * i)}] for i in range(6)}
        alone = {cid: ask(c, m, max_tokens=12)[0] for cid, m in convs.items()}  # one at a time, no session
        got, errors = {}, []

        def talk(cid):
            try:
                got[cid] = ask(c, convs[cid], cid, max_tokens=12)[0]
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=talk, args=(cid,)) for cid in convs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and got == alone
    assert engine.kv_pool.pools  # the batched steps attended through a pool (endless.serve.pool)


def test_errors_400_401_429_and_disconnect_frees_the_slot(model, tok):
    engine, server = serve(model, tok, max_batch=1, max_queue=0, limits=Limits(max_prompt_bytes=1000, max_tokens=5000))
    with server as url:
        h = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=h)
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        for body, word in (({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
                           ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
                           ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, "max_tokens"),
                           ({"messages": [{"role": "user", "content": "x" * 2000}]}, "limit"),
                           ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
                           ({"messages": [{"role": "user", "content": "x"}], "conversation_id": "../etc"}, "conversation_id"),
                           ({"messages": [{"role": "system", "content": "y " * 300}, {"role": "user", "content": "x"}]},
                            "shorten the system prompt")):
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=h)
            assert r.status_code == 400, body
            assert word in r.json()["error"]["message"] or word == r.json()["error"]["param"]
        c = client(url)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt=[[1, 2.5]], max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        # one slot, no queue: a second request while a long reply streams gets 429 ...
        long = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=5000,
                                         temperature=0, stream=True)
        chunks = iter(long)
        next(chunks), next(chunks)  # the role, then a first token: it runs
        assert len(engine.active) == 1
        with pytest.raises(openai.RateLimitError):
            ask(c, [{"role": "user", "content": "me too"}])
        # ... and a client that goes away frees the slot for the next one
        long.close()
        for _ in range(100):
            if not engine.active and not engine.waiting:
                break
            threading.Event().wait(0.05)
        assert ask(c, [{"role": "user", "content": "me too"}])[1].completion_tokens == 6
        assert engine.counts["rejected"] == 1


def test_completions_echo_logprobs_for_lm_eval(model, tok):
    """What lm-evaluation-harness's local-completions asks: token-id prompts, echo, logprobs=1."""
    import torch

    from endless.stream import Stream

    engine, server = serve(model, tok, "sinks:4+60")
    with server as url:
        c = client(url)
        prompts = [[5, 6, 7, 8, 9] * 20, [11, 12, 13]]
        r = c.completions.create(model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
        for p, choice in zip(prompts, sorted(r.choices, key=lambda ch: ch.index), strict=True):
            lp = choice.logprobs
            assert len(lp.token_logprobs) == len(p) + 1 and lp.token_logprobs[0] is None
            ref = Stream(model, "sinks:4+60").feed(torch.tensor(p))[0]
            assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(p)]), ref[1:], atol=1e-4)
            assert all(len(t) == 1 for t in lp.top_logprobs[1:])
        r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0.8, top_p=0.9,
                                 seed=3, stop=["zzzz"])
        again = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0.8, top_p=0.9,
                                     seed=3, stop=["zzzz"])
        assert r.choices[0].text == again.choices[0].text  # seeded sampling repeats


@pytest.mark.slow
def test_smollm2_chat(real_model):
    """The real model: a streamed and an unstreamed turn of one conversation, sensible text."""
    from endless.cli.common import inference_model

    hf, tok = real_model
    engine = Engine(inference_model(hf), tok, parse_policy("sinks:prefix+1020"), model_name="smollm2-135m")
    with running(create_app(engine)) as url:
        c = client(url, key="unused")
        msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
        text, usage = ask(c, msgs, "fr", max_tokens=8)
        assert "Paris" in text and usage.refed is False
        msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy? One word."}]
        stream = c.chat.completions.create(model="smollm2-135m", messages=msgs, temperature=0, max_tokens=8, stream=True,
                                           extra_body={"conversation_id": "fr"}, stream_options={"include_usage": True})
        chunks = list(stream)
        reply = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert "Rome" in reply
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0 and chunks[-1].usage.fed_tokens < 30


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="the compiled step needs a C++ compiler")
def test_compiled_step_serves_a_lone_conversation_and_compiles_only_at_start(model, tok, monkeypatch):
    # serve --compile-step: graphs built before serving for the default chat header and for
    # completions; a lone conversation then decodes through them with the eager engine's reply,
    # and one whose system prompt gives another ring size decodes eagerly, compiling nothing
    from endless.step import CompiledStep
    from endless.transformer import Transformer

    compiled = Transformer(model.hf, pack=True).compile_step()
    engine = Engine(compiled, tok, parse_policy("sinks:prefix+64"), model_name="tiny")
    built = engine.compile_step_now()
    assert len(built) == 2 and "sinks:4+64" in built and len(compiled.step._graphs) == 2
    runs = []
    call = CompiledStep.__call__
    monkeypatch.setattr(CompiledStep, "__call__", lambda self, state, ids: runs.append(1) or call(self, state, ids))
    _, eager_server = serve(Transformer(model.hf, pack=True), tok)
    plain, custom = [{"role": "user", "content": "Hello there"}], [SYSTEM, {"role": "user", "content": "Hello"}]
    with eager_server as url:
        want = [ask(client(url), m, max_tokens=8)[0] for m in (plain, custom)]
    with running(create_app(engine, api_key=KEY)) as url:
        assert ask(client(url), plain, max_tokens=8)[0] == want[0]
        assert len(runs) == 8  # each of the 8 chosen tokens was read back through the compiled step
        assert ask(client(url), custom, max_tokens=8)[0] == want[1]
    assert len(runs) == 8 and len(compiled.step._graphs) == 2
