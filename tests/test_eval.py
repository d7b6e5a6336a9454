"""The StreamingLLM evaluations (issue 4) on tiny models: exact chunked perplexity, the exact
(subsampled) re-computation reference, the sink ablation's specs, StreamEval's generator and
scoring, streaming ARC's branching and choice, and the CLI end to end with a byte tokenizer."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from fam_helpers import byte_tokenizer, tiny_folder

from endless.cli.eval_sinks import ablation_specs
from endless.eval.ppl import evaluate, moving_average, perplexity, ratio_to, recompute_nll, streaming_nll
from endless.eval.streameval import make_stream, run_streameval, stream_text
from endless.models.tiny import tiny_model
from endless.stream import Stream
from endless.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_model("llama", seed=0, vocab_size=257, max_position_embeddings=1024,
                                  initializer_range=0.2))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def ids(n, seed=0, vocab=257):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", ["sinks:4+28", "window:32", "dense", "bswa:8x3"])
def test_chunked_nll_equals_token_by_token(model, spec):
    x = ids(150)
    one = streaming_nll(model, x, spec, chunk=1)
    for chunk in (7, 64):
        assert torch.allclose(streaming_nll(model, x, spec, chunk=chunk), one, atol=1e-4, rtol=0)
    assert one.shape == (149,) and not one.isnan().any()


def test_window_policies_equal_dense_while_the_text_fits(model):
    x = ids(30)
    dense = streaming_nll(model, x, "dense", chunk=8)
    for spec in ("sinks:4+28", "window:32", "recompute:32"):
        assert torch.allclose(evaluate(model, x, spec, chunk=8).nll, dense, atol=1e-4, rtol=0), spec


def test_recompute_reference_is_exact_and_subsamples(model):
    x = ids(120, seed=1)
    streamed = streaming_nll(model, x, "recompute:16", chunk=5)
    full = recompute_nll(model, x, 16)
    assert torch.allclose(full, streamed, atol=1e-5, rtol=0)
    every = recompute_nll(model, x, 16, every=6)
    scored = ~every.isnan()
    assert scored[:16].all()  # the first window shares one causal pass
    assert int(scored[16:].sum()) == len(range(16 + 6, 120, 6))
    assert torch.allclose(every[scored], streamed[scored], atol=1e-5, rtol=0)
    res = evaluate(model, x, "recompute:16", recompute_every=6)
    assert res.tokens == int(scored.sum()) and math.isclose(res.ppl, perplexity(every))


def test_ratio_is_taken_on_the_reference_tokens(model):
    x = ids(100, seed=2)
    ref = evaluate(model, x, "recompute:16", recompute_every=5)
    other = evaluate(model, x, "sinks:2+14")
    both = ~ref.nll.isnan()
    want = math.exp(float(other.nll[both].mean() - ref.nll[both].mean()))
    assert math.isclose(ratio_to(other, ref), want, rel_tol=1e-9)
    assert ratio_to(ref, ref) == 1.0


def test_moving_average_ignores_nan():
    x = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    assert torch.allclose(moving_average(x, 2), torch.tensor([1.0, 1.0, 3.0, 4.0], dtype=torch.float64))
    assert torch.allclose(moving_average(torch.arange(5.0), 10), torch.tensor([0, 0.5, 1, 1.5, 2], dtype=torch.float64))


def test_ablation_specs():
    assert ablation_specs(256, 198) == ["sinks:0+256", "sinks:1+255", "sinks:2+254", "sinks:4+252", "sinks:8+248",
                                        "sinks:4+252,sink=#198", "recompute:256"]
    assert ablation_specs(64, None, recompute=False)[-1] == "sinks:8+56"


def test_streameval_generator_is_deterministic_and_its_answers_are_right():
    a, b = make_stream(3, 60), make_stream(3, 60)
    assert a == b and make_stream(4, 60) != a
    text = stream_text(a)
    values = dict(re.findall(r"^line (\S+): REGISTER_CONTENT is <(\d+)>$", text, flags=re.M))
    assert len(values) == 60  # keys unique
    queries = [s for s in a if s.answer is not None]
    assert len(queries) == len(range(20, 61, 10))
    lines = [s for s in a if s.line is not None]
    for q in queries:
        key = re.search(r"in line (\S+)\?", q.text).group(1)
        assert values[key] == q.answer and lines[q.asked].text.startswith(f"line {key}:")
    # the question for line j comes `back` lines after it
    assert [q.asked for q in queries] == [0, 10, 20, 30, 40]


def test_streameval_scores_exactly_what_greedy_decoding_writes(model, tok):
    segs = make_stream(0, 30, every=5, back=10, digits=2)
    outcomes = run_streameval(model, tok, segs, "sinks:4+124", chunk=16)
    s = Stream(model, "sinks:4+124", chunk=16)
    greedy = []
    for seg in segs:
        s.feed(torch.tensor(tok(seg.text, add_special_tokens=False).input_ids), logprobs=False)
        if seg.answer is not None:
            want = tok(seg.answer, add_special_tokens=False).input_ids
            snap = s.snapshot()
            greedy.append(list(s.generate(len(want))) == want)
            s.restore(snap)
            s.feed(torch.tensor(want), logprobs=False)
    assert [o.correct for o in outcomes] == greedy and len(greedy) == 5
    assert all(o.distance > 0 for o in outcomes)


@pytest.mark.parametrize("spec", ["sinks:2+20", "dense", "recompute:16", "fam:8x1+2"])
def test_snapshot_restore_is_exact(model, spec):
    s = Stream(model, spec, chunk=8)
    s.feed(ids(40))
    snap = s.snapshot()
    first = s.feed(ids(30, seed=5))
    s.feed(ids(7, seed=6))
    s.restore(snap)
    assert s.position == 40
    assert torch.equal(s.feed(ids(30, seed=5)), first)


@pytest.mark.parametrize("spec", ["sinks:2+20", "fam:8x1+2"])
def test_snapshot_into_reuses_its_buffers_and_stays_exact(model, spec):
    s = Stream(model, spec, chunk=8)
    snap = s.snapshot()  # taken before anything is fed: the buffers are the state's fixed ones
    buffers = [t.data_ptr() for t in snap["tensors"].values()]
    s.feed(ids(40))
    assert s.snapshot(into=snap) is snap and [t.data_ptr() for t in snap["tensors"].values()] == buffers
    first = s.feed(ids(30, seed=5))
    s.restore(snap)
    assert s.position == 40
    assert torch.equal(s.feed(ids(30, seed=5)), first)


def test_arc_picks_the_best_choice_per_character_and_keeps_the_gold_answer(model, tok):
    from endless.data.arc import Question
    from endless.eval.arc import PROMPT, isolated, streaming_arc

    qs = [Question("a", "Which is blue?", ("sky", "grass is green", "sun"), 0),
          Question("b", "Two plus two?", ("four", "five"), 1)]
    outs = streaming_arc(model, tok, qs, "dense")

    def loglik(prefix, choice):
        s = Stream(model, "dense")
        s.feed(torch.tensor(tok(prefix, add_special_tokens=False).input_ids), logprobs=False)
        return float(s.feed(torch.tensor(tok(" " + choice, add_special_tokens=False).input_ids))[0].double().sum())

    history = ""
    for q, o in zip(qs, outs, strict=True):
        prefix = history + PROMPT.format(question=q.question)
        per_char = [loglik(prefix, c) / (len(c) + 1) for c in q.choices]
        assert o.predicted == max(range(len(q.choices)), key=per_char.__getitem__)
        history = prefix + " " + q.choices[q.gold] + "\n\n"
    assert outs[1].position == len(tok(PROMPT.format(question=qs[0].question), add_special_tokens=False).input_ids) \
        + len(tok(" sky", add_special_tokens=False).input_ids) + 2
    assert [o.index for o in isolated(model, tok, qs)] == [0, 1]


def test_attention_maps_equal_transformers_attentions():
    from endless.analysis.attention import attention_maps, first_k_share, uniform_share

    hf = tiny_model("llama", seed=0)
    hf.config._attn_implementation = "eager"
    x = ids(24, vocab=128)
    want = torch.stack(hf(x[None], output_attentions=True).attentions)[:, 0]  # (L, H, N, N)
    got = attention_maps(Transformer(hf), x)
    assert torch.allclose(got, want, atol=1e-5)
    share = first_k_share(got, 1)
    assert torch.allclose(share, want[:, :, 1:, 0].mean(-1), atol=1e-5)
    uniform = torch.ones(1, 1, 10, 10).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    assert math.isclose(float(first_k_share(uniform, 2)[0, 0]), uniform_share(10, 2), rel_tol=1e-6)


# -- the CLI end to end on a tiny model with a byte tokenizer ---------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny-eval"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("In the beginning was the word, and the word was with the stream. " * 20)
    return path


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "endless.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(err):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("Loading", "\r"))]
    assert "Traceback" not in err and lines and lines[-1].startswith("endless: error: "), err
    return lines[-1]


def test_cli_eval_ppl_and_sinks(folder, text, tmp_path):
    out = tmp_path / "ppl.json"
    code, stdout, err = run_cli("eval", "ppl", "--model", folder, "--text", text, "--tokens", "600",
                                "--policy", "sinks:4+60", "--policy", "window:64", "--policy", "dense",
                                "--chunk", "100", "--threads", "1", "--json", out, "--plot", tmp_path / "p.png")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == ["sinks:4+60", "window:64", "dense"]
    assert all(r["tokens"] == 599 and r["ppl"] > 1 for r in data["results"])
    from safetensors.torch import load_file

    nll = load_file(str(tmp_path / data["nll"]))
    assert math.isclose(math.exp(float(nll["dense"].double().mean())), data["results"][2]["ppl"], rel_tol=1e-5)
    assert (tmp_path / "p.png").stat().st_size > 1000 and "sinks:4+60" in stdout
    code, stdout, err = run_cli("eval", "sinks", "--model", folder, "--text", text, "--tokens", "300", "--cache", "32",
                                "--recompute-every", "16", "--threads", "1", "--json", tmp_path / "s.json")
    assert code == 0, err
    specs = [r["policy"] for r in json.loads((tmp_path / "s.json").read_text())["results"]]
    assert specs[0] == "sinks:0+32" and specs[-1] == "recompute:32" and "sinks:4+28,sink=#" in specs[-2]


def test_cli_eval_streameval_arc_and_analyze(folder, tmp_path):
    code, stdout, err = run_cli("eval", "streameval", "--model", folder, "--lines", "30", "--caches", "64",
                                "--threads", "1", "--json", tmp_path / "se.json", "--plot", tmp_path / "se.png")
    assert code == 0, err
    data = json.loads((tmp_path / "se.json").read_text())
    assert {r["policy"] for r in data["results"]} == {"sinks:4+60", "window:64", "dense"}
    assert all(0 <= r["accuracy"] <= 1 for r in data["results"])
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"id": i, "question": f"What is {i}?", "choices": ["one", "two"], "gold": i % 2})
                          + "\n" for i in range(6)))
    code, stdout, err = run_cli("eval", "arc", "--model", folder, "--data", qs, "--policy", "sinks:4+60",
                                "--threads", "1", "--json", tmp_path / "arc.json")
    assert code == 0, err
    res = json.loads((tmp_path / "arc.json").read_text())["results"]
    assert [r["policy"] for r in res] == ["one-at-a-time", "sinks:4+60"] and all(r["questions"] == 6 for r in res)
    code, stdout, err = run_cli("analyze", "attention", "--model", folder, "--tokens", "40", "--threads", "1",
                                "--text", qs, "--json", tmp_path / "a.json", "--plot", tmp_path / "m.png",
                                "--bars", tmp_path / "b.png")
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())
    assert len(a["first_k"]["1"]["per_layer_mean"]) == 2 and (tmp_path / "b.png").exists()


def test_cli_eval_bad_input_is_one_line(folder, text, tmp_path):
    code, _, err = run_cli("eval", "ppl", "--model", folder, "--policy", "sinkz:4+60")
    assert code == 2 and "sinks:S+W" in one_line_error(err)
    code, _, err = run_cli("eval", "ppl", "--model", folder, "--text", text, "--tokens", "100",
                           "--policy", "sinks:4+252", "--threads", "1")
    assert code == 2 and "not longer than the largest cache" in one_line_error(err)
    code, _, err = run_cli("eval", "ppl", "--model", folder, "--text", tmp_path / "none.txt", "--threads", "1")
    assert code == 2 and "no such text file" in one_line_error(err)
    code, _, err = run_cli("eval", "arc", "--model", folder, "--data", tmp_path / "none.jsonl", "--threads", "1")
    assert code == 2 and "no such question file" in one_line_error(err)
    code, _, err = run_cli("eval", "streameval", "--model", folder, "--lines", "5", "--threads", "1")
    assert code == 2 and "--lines" in one_line_error(err)
