"""PassKey data and evaluation (docs/methods.md section 3; src/endless/data/passkey.py, eval/passkey.py)."""

import json
import random
import subprocess
import sys

import pytest
import torch
from fam_helpers import byte_tokenizer, tiny_folder

from endless.data.passkey import (
    FILLER,
    INSTRUCTION,
    KEY_MARK,
    QUERY_MARK,
    QUESTION,
    Example,
    PasskeyFormat,
    collate,
    digit_example,
    passkey_example,
)
from endless.errors import EndlessError
from endless.eval.passkey import passkey_accuracy, passkey_answer_loss, plot, summarize, table
from endless.models.tiny import tiny_model
from endless.policies.spec import parse_policy
from endless.stream import Stream
from endless.transformer import Transformer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_is_the_papers_format(tok, depth):
    e = passkey_example(tok, 400, depth, rng=random.Random(3), digits=5)
    assert len(e.prompt) == 400
    text = tok.decode(e.prompt)
    key_sentence = f" The pass key is {e.key}. Remember it. {e.key} is the pass key."
    assert text.startswith(INSTRUCTION) and text.endswith(QUESTION)
    assert text.count(key_sentence) == 1
    assert len(e.key) == 5 and e.key.isdigit() and e.key[0] != "0"
    assert tok.decode(e.answer) == f" {e.key}"
    before, after = text[len(INSTRUCTION):-len(QUESTION)].split(key_sentence)
    filler = FILLER * 20
    assert filler.startswith(before) and filler[len(before):].startswith(after)  # one filler stream, cut at the key
    n_fill = len(before) + len(after)
    assert len(before) == round(depth * n_fill)


def test_passkey_too_short_is_a_clear_error(tok):
    need = PasskeyFormat(tok).fixed_tokens(5)
    PasskeyFormat(tok).example(need, 0.5, "12345")
    with pytest.raises(EndlessError, match="at least"):
        PasskeyFormat(tok).example(need - 1, 0.5, "12345")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_more_queries_answer_inside_the_prompt_and_are_graded(tok, depth):
    """``queries=3``: the same length, the key once, two answered questions spread over the filler
    after it, and collate grades those answers as well as the last one."""
    fmt = PasskeyFormat(tok)
    one = fmt.example(400, depth, "31415")
    assert one.spans == () and fmt.example(400, depth, "31415", queries=1) == one  # the paper's format unchanged
    e = fmt.example(400, depth, "31415", queries=3)
    assert len(e.prompt) == 400 and len(e.spans) == 2
    text = tok.decode(e.prompt)
    assert text.startswith(INSTRUCTION) and text.endswith(QUESTION) and text.count("The pass key is 31415.") == 1
    assert text.count(QUESTION) == 3
    key_end = text.index("is the pass key.")
    for lo, hi in e.spans:
        assert e.prompt[lo:hi] == e.answer and tok.decode(e.prompt[lo - len(fmt.question):lo]) == QUESTION
        assert len(tok.decode(e.prompt[:lo])) > key_end  # every question comes after the key
    ids, targets = collate([e])
    graded = (targets[0] != -100).nonzero().flatten().tolist()
    want = [p for lo, hi in e.spans for p in range(lo - 1, hi - 1)] + list(range(399, 399 + len(e.answer)))
    assert graded == want and targets[0, graded].tolist() == ids[0, [p + 1 for p in graded]].tolist()
    assert fmt.fixed_tokens(5, 3) == fmt.fixed_tokens(5) + 2 * (len(fmt.question) + len(e.answer))
    with pytest.raises(EndlessError, match="at least"):
        fmt.example(fmt.fixed_tokens(5, 3) - 1, 0.5, "31415", queries=3)


def test_digit_example_and_collate():
    rng = random.Random(0)
    e = digit_example(30, 0.5, rng=rng, vocab=128, digits=4)
    assert len(e.prompt) == 30 and e.prompt[-1] == QUERY_MARK
    k = e.prompt.index(KEY_MARK)
    assert e.prompt[k + 1 : k + 5] == e.answer and "".join(map(str, e.answer)) == e.key
    assert all(t >= 12 for i, t in enumerate(e.prompt[:-1]) if not k <= i <= k + 4)
    short = digit_example(10, 0.0, rng=rng, vocab=128, digits=4)
    ids, targets = collate([e, short])
    assert ids.shape == targets.shape == (2, 34)
    assert targets[0, 29:33].tolist() == e.answer and (targets[0, :29] == -100).all() and targets[0, 33] == -100
    assert targets[1, 9:13].tolist() == short.answer and (targets[1, 13:] == -100).all()
    text = Example([5, 6, 7], [8], answer_only=False)
    assert collate([text])[1][0].tolist() == [6, 7, 8, -100]


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_model("llama", seed=1, initializer_range=0.2))


@pytest.mark.parametrize("spec", ["fam:8x1+4", "bswa:8x1"])
def test_accuracy_is_greedy_exact_match_stream_and_parallel_agree(model, spec):
    """Answers set to the model's own greedy continuation are all correct under both methods;
    one changed digit makes that example wrong."""
    rng = random.Random(1)
    examples = []
    for n in (20, 20, 33):
        e = digit_example(n, rng.random(), rng=rng, vocab=128)
        s = Stream(model, spec)
        s.feed(e.prompt, logprobs=False)
        examples.append(Example(e.prompt, list(s.generate(4)), key="x"))
    for method in ("stream", "parallel"):
        assert passkey_accuracy(model, spec, examples, batch=2, method=method) == [True, True, True]
    examples[1] = Example(examples[1].prompt, examples[1].answer[:3] + [(examples[1].answer[3] + 1) % 128])
    for method in ("stream", "parallel"):
        assert passkey_accuracy(model, spec, examples, batch=2, method=method) == [True, False, True]
    res = summarize(parse_policy(spec).spec, examples, [True, False, True])
    assert [(r.length, r.accuracy, r.n) for r in res] == [(20, 0.5, 2), (33, 1.0, 1)]


@pytest.mark.parametrize("spec", ["fam:8x1+4", "bswa:8x1"])
def test_answer_loss_equals_the_streams_log_probs(model, spec):
    """The answer loss (parallel schedule, LM head on the answer only) is the mean negative
    log-prob the stream gives the answer tokens, teacher-forced; summarize averages it."""
    rng = random.Random(2)
    examples = [digit_example(n, rng.random(), rng=rng, vocab=128) for n in (20, 20, 41)]
    losses = passkey_answer_loss(model, spec, examples, batch=2)
    for e, got in zip(examples, losses, strict=True):
        lp = Stream(model, spec).feed(e.ids)
        assert got == pytest.approx(float(-lp[0, len(e.prompt):].mean()), abs=1e-4)
    res = summarize(spec, examples, [True, False, True], losses=losses)
    assert res[0].loss == pytest.approx((losses[0] + losses[1]) / 2, abs=1e-4) and res[1].loss == pytest.approx(losses[2], abs=1e-4)
    assert "answer loss" in table(res)
    with pytest.raises(ValueError, match="fam/bswa"):
        passkey_answer_loss(model, "sinks:4+60", examples)


def test_table_and_plot(tmp_path):
    from endless.eval.passkey import PasskeyResult

    rs = [PasskeyResult("fam:8x1+4", 96, 1.0, 10), PasskeyResult("bswa:8x1", 96, 0.25, 10),
          PasskeyResult("fam:8x1+4", 6144, 0.9, 10)]
    lines = table(rs).splitlines()
    assert lines[0].split() == ["policy", "96", "6144"]
    assert lines[1].split() == ["fam:8x1+4", "1.00", "0.90"] and lines[2].split() == ["bswa:8x1", "0.25", "-"]
    plot(rs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "endless.cli.main", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_cli_eval_passkey_json(tmp_path):
    folder = tiny_folder(tmp_path / "tiny")
    code, out, err = run_cli("eval", "passkey", "--model", str(folder), "--policy", "fam:32x1+4", "--policy", "bswa:32x1",
                             "--lengths", "250,300", "--depths", "0.5", "--examples", "2", "--threads", "1", "--loss",
                             "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"))
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    cells = {(r["policy"], r["length"]) for r in data["results"]}
    assert cells == {(p, n) for p in ("fam:32x1+4", "bswa:32x1") for n in (250, 300)}
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == 2 and r["loss"] > 0 for r in data["results"])
    assert "fam:32x1+4" in out and (tmp_path / "r.png").is_file()


def test_cli_eval_passkey_bad_input_is_one_line(tmp_path):
    folder = tiny_folder(tmp_path / "tiny")
    code, _, err = run_cli("eval", "passkey", "--model", str(folder), "--lengths", "50", "--threads", "1")
    assert code == 2 and "Traceback" not in err and "at least" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", "passkey", "--model", str(folder), "--policy", "sinks:4+60", "--loss", "--threads", "1")
    assert code == 2 and "--loss" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", "passkey", "--fam", str(tmp_path / "nothing"), "--threads", "1")
    assert code == 2 and "no FAM checkpoint" in err and "Traceback" not in err


def test_stream_batch_equals_single(model):
    """Reading prompts as a batch of streams gives the same verdicts as one at a time."""
    rng = random.Random(5)
    examples = [digit_example(24, rng.random(), rng=rng, vocab=128) for _ in range(4)]
    torch.manual_seed(0)
    assert passkey_accuracy(model, "fam:8x0+4", examples, batch=4) == passkey_accuracy(model, "fam:8x0+4", examples, batch=1)


@pytest.mark.parametrize("text,ok", [(" 60494.", True), (" 6049459", True), (" 6049.", False), (" 1111111", False),
                                     (" the key is 60494", True), (" none", False)])
def test_exact_match_scores_the_first_digits_generated(text, ok):
    from endless.data.passkey import Example
    from endless.eval.passkey import _correct

    class Decode:  # generated "ids" are the characters themselves
        def decode(self, ids, skip_special_tokens=True):
            return "".join(ids)

    assert _correct(list(text), Example([1], [2], key="60494"), Decode()) is ok


def test_prose_filler_replaces_the_sentences_and_differs_between_keys(tok, tmp_path):
    prose = tmp_path / "book.txt"
    prose.write_text("Call me Ishmael. Some years ago, never mind how long precisely, having little money.\n" * 3
                     + "It was the best of times, it was the worst of times. " * 40)
    fmt = PasskeyFormat(tok, filler=str(prose))
    a, b = fmt.example(600, 0.5, "12345"), fmt.example(600, 0.5, "67890")
    assert len(a.prompt) == len(b.prompt) == 600
    text = tok.decode(a.prompt)
    assert text.startswith(INSTRUCTION) and text.endswith(QUESTION) and "The pass key is 12345" in text
    assert "The grass is green" not in text and ("times" in text or "Ishmael" in text)
    assert a.prompt[100:200] != b.prompt[100:200]  # the filler starts at a key-dependent place
    assert PasskeyFormat(tok).example(600, 0.5, "12345").prompt != a.prompt
    with pytest.raises(EndlessError, match="no such text file"):
        PasskeyFormat(tok, filler=str(tmp_path / "missing.txt"))


def test_eval_passkey_refuses_a_missing_filler_file_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "endless.cli.main", "eval", "passkey", "--filler",
                        str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "no such text file" in p.stderr
