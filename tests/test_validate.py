"""Issue 24: every user-facing value is validated in one place (``endless.validate``).

A bad value on the command line is one line on stderr naming the flag and exit code 2 (argparse's
usage errors included: ``endless.cli.main.OneLineParser`` makes them one line, with no usage
banner); in Python the same rule raises ``EndlessError`` with the same wording. The sweep runs the
CLI in-process and every case fails before a model loads, so the whole file takes seconds.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from endless.cli.main import main
from endless.errors import EndlessError
from endless.validate import CHUNK, MAX_NEW_TOKENS, SEED, TEMPERATURE, THREADS, TOKENS, Rule, number_list, probability

OUT = "/nonexistent-endless-dir/ckpt"  # never written: every case fails before training

# (argv, a piece of the one line): at least 40 bad inputs across the commands, none taken silently.
BAD = [
    # generate
    (["generate", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--temperature", "inf"], "--temperature"),
    (["generate", "hi", "--temperature", "hot"], "--temperature"),
    (["generate", "hi", "--temperature", "1000"], "--temperature"),
    (["generate", "hi", "--threads", "0"], "--threads"),
    (["generate", "hi", "--threads", "-3"], "--threads"),
    (["generate", "hi", "--threads", "1.5"], "--threads"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "hi", "--seed", "-1"], "--seed"),
    (["generate", "hi", "--stats", "-1"], "--stats"),
    (["generate", "hi", "--policy", "sinks:4+"], "sinks:4+"),
    (["generate", "hi", "--policy", "fam:0x1+8"], "policy 'fam:0x1+8': block must be >= 1"),
    (["generate", "hi", "--policy", "bswa:abc"], "bswa:abc"),
    (["generate", "hi", "--policy", "window:-5"], "policy 'window:-5': window must be >= 1"),
    (["generate", "hi", "--model", "/no/such/model"], "/no/such/model"),
    (["generate", "hi", "--fam", "/no/such/ckpt"], "/no/such/ckpt"),
    (["generate", "hi", "--dtype", "float16"], "--dtype"),
    (["generate", "hi", "--device", "tpu"], "--device"),
    (["generate", "hi", "--compile", "--dtype", "bfloat16"], "--compile"),
    (["generate", "hi", "--no-such-flag"], "--no-such-flag"),
    # chat
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["chat", "--temperature", "-0.5"], "--temperature"),
    (["chat", "--seed", "abc"], "--seed"),
    (["chat", "--policy", "fam:8x1+4,bogus"], "bogus"),
    # eval ppl / passkey
    (["eval", "ppl", "--chunk", "0"], "--chunk"),
    (["eval", "ppl", "--tokens", "1"], "--tokens"),
    (["eval", "ppl", "--recompute-every", "0"], "--recompute-every"),
    (["eval", "ppl", "--smooth", "-1"], "--smooth"),
    (["eval", "ppl", "--policy", "dense:3"], "dense:3"),
    (["eval", "passkey", "--lengths", "1024,abc"], "--lengths"),
    (["eval", "passkey", "--lengths", "0"], "--lengths"),
    (["eval", "passkey", "--lengths", ","], "--lengths"),
    (["eval", "passkey", "--depths", "0.5,1.5"], "--depths"),
    (["eval", "passkey", "--depths", "nan"], "--depths"),
    (["eval", "passkey", "--batch", "0"], "--batch"),
    (["eval", "passkey", "--examples", "0"], "--examples"),
    (["eval", "passkey", "--digits", "0"], "--digits"),
    # bench
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--positions", "4096,1024"], "--positions"),
    (["bench", "--positions", "1024,x"], "--positions"),
    (["bench", "--caches", "8"], "--caches"),
    (["bench", "--rounds", "0"], "--rounds"),
    (["bench", "--window", "-1"], "--window"),
    # verify
    (["verify", "--chunk", "0"], "--chunk"),
    (["verify", "--tokens", "1"], "--tokens"),
    (["verify", "--tolerance", "0"], "--tolerance"),
    (["verify", "--tolerance=-1e-3"], "--tolerance: must be a number in (0,"),
    # train fam-tiny
    (["train", "fam-tiny", "--steps", "0"], "--steps"),
    (["train", "fam-tiny", "--lr", "0"], "--lr"),
    (["train", "fam-tiny", "--batch", "0"], "--batch"),
    (["train", "fam-tiny", "--minutes", "-1"], "--minutes"),
    (["train", "fam-tiny", "--min-len", "64", "--max-len", "32"], "--max-len"),
    (["train", "fam-tiny", "--kv-heads", "3"], "--kv-heads"),
    (["train", "fam-tiny", "--memories", "0,x"], "--memories"),
    (["train", "fam-tiny", "--eval-lengths", "96,-1"], "--eval-lengths"),
    (["train", "fam-tiny", "--rsp", "1.5"], "--rsp"),
    (["train", "fam-tiny", "--curriculum", "16,8"], "--curriculum"),
    (["train", "fam-tiny", "--policies", "sinks:4+"], "sinks:4+"),
    # train fam
    (["train", "fam", "--out", OUT, "--steps", "0"], "--steps"),
    (["train", "fam", "--out", OUT, "--lr", "nan"], "--lr"),
    (["train", "fam", "--out", OUT, "--min-len", "900", "--max-len", "100"], "--max-len"),
    (["train", "fam", "--out", OUT, "--policy", "sinks:4+"], "sinks:4+"),
    (["train", "fam", "--out", OUT, "--text-fraction", "2"], "--text-fraction"),
    (["train", "fam", "--out", OUT, "--curriculum", "0"], "--curriculum"),
    (["train", "fam", "--steps", "10"], "--out"),
    # soak
    (["soak", "--tokens", "100"], "--tokens"),
    (["soak", "--chunk", "0"], "--chunk"),
    (["soak", "--policy", "window:0"], "policy 'window:0'"),
    # serve
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--max-batch", "8", "--max-sessions", "4"], "--max-sessions"),
    (["serve", "--max-queue", "-1"], "--max-queue"),
    # info, demo
    (["info", "--model", "/no/such/model"], "/no/such/model"),
    (["info", "--threads", "0"], "--threads"),
    (["info", "--dtype", "float16"], "--dtype"),
    (["demo", "--tokens", "100"], "--tokens"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """A case that reaches ``set_threads`` must not leave this process on every core."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_sweep_is_long_enough():
    assert len(BAD) >= 45
    commands = {tuple(argv[:2]) if argv[0] in ("eval", "train") else argv[0] for argv, _ in BAD}
    assert {"generate", "chat", ("eval", "ppl"), ("eval", "passkey"), "bench", "verify", ("train", "fam-tiny"),
            ("train", "fam"), "soak", "serve", "info"} <= commands


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    if "--threads" not in argv:
        argv = [*argv, "--threads", "1"]  # a case that got as far as set_threads: one core, not all
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("endless: error: ") and needle in lines[0], err


# -- the Python API: the same rules, the same wording -------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from endless.models.tiny import tiny_model
    from endless.transformer import Transformer

    return Transformer(tiny_model("llama"))


@pytest.mark.parametrize("kwargs,rule,value", [
    ({"chunk": 0}, CHUNK, 0), ({"chunk": -4}, CHUNK, -4), ({"chunk": 2.5}, CHUNK, 2.5),
    ({"batch": 0}, Rule("batch", int, 1, 4096), 0),
])
def test_stream_refuses_like_the_cli(tiny, kwargs, rule, value):
    from endless.stream import Stream

    with pytest.raises(EndlessError) as e:
        Stream(tiny, "sinks:4+60", **kwargs)
    assert str(e.value) == f"{rule.name} ({rule.flag}) {rule.problem(value)}"
    assert f"must be {rule.accepted()}" in str(e.value)


def test_stream_refuses_a_bad_policy(tiny):
    from endless.stream import Stream

    with pytest.raises(EndlessError, match="cannot parse policy 'sinks:4\\+'"):
        Stream(tiny, "sinks:4+")


@pytest.mark.parametrize("kwargs,flag", [
    ({"max_new_tokens": 0}, "--max-new-tokens"), ({"temperature": -1.0}, "--temperature"),
    ({"temperature": math.nan}, "--temperature"), ({"temperature": 1e9}, "--temperature"),
    ({"seed": -1}, "--seed"), ({"seed": "7"}, "--seed"),
])
def test_generate_refuses_before_the_first_token(tiny, kwargs, flag):
    from endless.stream import Stream

    s = Stream(tiny, "sinks:4+60")
    s.feed(torch.tensor([1, 2, 3]), logprobs=False)
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(EndlessError, match=f"\\({flag}\\) must be"):
        s.generate(args.pop("max_new_tokens"), **args)  # refused at the call, not at the first next()
    with pytest.raises(EndlessError, match="temperature \\(--temperature\\) must be a number in \\[0, 100\\]"):
        s.next_token(temperature=-1.0)
    assert len(list(s.generate(2, temperature=0.5, seed=1))) == 2  # good values still run


def test_cli_and_python_word_a_refusal_alike(capsys):
    assert main(["generate", "hi", "--temperature", "-1", "--threads", "1"]) == 2
    cli = capsys.readouterr().err.strip()
    with pytest.raises(EndlessError) as e:
        TEMPERATURE.check(-1.0)
    # CLI: "endless: error: argument --temperature: must be ... got '-1'"; Python: "temperature (--temperature) must be ... got -1.0"
    assert cli.split("argument --temperature: ")[1].split(", got")[0] == str(e.value).split(") ")[1].split(", got")[0]


@pytest.mark.parametrize("kwargs,flag", [
    ({"steps": 0}, "--steps"), ({"lr": 0.0}, "--lr"), ({"lr": math.inf}, "--lr"), ({"batch": 0}, "--batch"),
    ({"minutes": 0}, "--minutes"), ({"min_len": 64, "max_len": 32}, "--max-len"), ({"rsp": 2.0}, "--rsp"),
    ({"vocab": 3}, "--vocab"), ({"seed": -1}, "--seed"), ({"carry_p": math.nan}, "--carry-p"),
])
def test_tiny_trainer_config_uses_the_same_rules(kwargs, flag):
    from endless.train.tiny_config import TinyConfig

    with pytest.raises(EndlessError, match=flag):
        TinyConfig(**kwargs)


@pytest.mark.parametrize("kwargs,flag", [
    ({"steps": 0}, "--steps"), ({"lr": -1.0}, "--lr"), ({"prompt_lr": 0.0}, "--prompt-lr"), ({"batch": 0}, "--batch"),
    ({"minutes": -1.0}, "--minutes"), ({"min_len": 900, "max_len": 100}, "--max-len"),
    ({"text_fraction": 1.5}, "--text-fraction"), ({"mixed_precision": "fp8"}, "--mixed-precision"),
    ({"lora_rank": 0}, "--lora-rank"), ({"max_depth": -0.1}, "--max-depth"), ({"queries": 0}, "--queries"),
])
def test_lora_trainer_config_uses_the_same_rules(kwargs, flag):
    pytest.importorskip("peft")
    from endless.train.fam import FamTrainConfig

    with pytest.raises(EndlessError, match=flag):
        FamTrainConfig(**kwargs)


def test_load_refuses_a_bad_dtype_and_device():
    from endless.models import load

    with pytest.raises(EndlessError, match="dtype"):
        load("tiny:llama", dtype="float16")
    with pytest.raises(EndlessError, match="device"):
        load("tiny:llama", device="tpu")


# -- property tests: generated input never escapes as another exception --------------------------

PIECES = st.sampled_from(["sinks:", "window:", "recompute:", "bswa:", "fam:", "dense", "prefix", "x", "+", ",",
                          ",firstres", ",norm", ",null", ",noffn", ",static", ",detach", ",sink=#", "-", " ", ":"])
DIGITS = st.integers(min_value=-3, max_value=10**6).map(str)
SPECS = st.one_of(st.text(max_size=40), st.lists(st.one_of(PIECES, DIGITS), max_size=10).map("".join))


@settings(max_examples=300, deadline=None)
@given(SPECS)
def test_parse_policy_returns_a_policy_or_one_line(spec):
    from endless.policies.spec import Policy, parse_policy

    try:
        policy = parse_policy(spec)
    except EndlessError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(policy, Policy)


RULES = [CHUNK, THREADS, TEMPERATURE, MAX_NEW_TOKENS, SEED, TOKENS, probability("rsp"),
         Rule("lr", float, 0.0, None, open_low=True), Rule("warmup", int, 0, None)]
NUMBER_TEXT = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-inf", "1e400", "0x10", "1_000", " 3 ", "1.0", "", "٣"]),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(RULES), NUMBER_TEXT)
def test_a_numeric_flag_parses_in_range_or_refuses(rule, text):
    try:
        value = rule.parse(text)
    except argparse.ArgumentTypeError as e:
        assert str(e).startswith("must be ") and "\n" not in str(e)
        return
    assert isinstance(value, rule.kind) and math.isfinite(value)
    assert rule.low is None or (value > rule.low if rule.open_low else value >= rule.low)
    assert rule.high is None or value <= rule.high


@settings(max_examples=300, deadline=None)
@given(st.lists(NUMBER_TEXT, max_size=5).map(",".join))
def test_a_list_flag_parses_in_range_or_refuses(text):
    parse = number_list(int, low=1, what="lengths")
    try:
        values = parse(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e)
        return
    assert values and all(isinstance(v, int) and v >= 1 for v in values)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["--temperature", "--threads", "--max-new-tokens", "--seed", "--stats", "--policy"]), NUMBER_TEXT)
def test_generated_flag_text_exits_2_or_parses(flag, text):
    """Through the whole parser (no model: the command is not run): a value or one usage line."""
    from endless.cli.main import UsageError, build_parser

    try:
        build_parser().parse_args(["generate", "hi", f"{flag}={text}"])
    except UsageError as e:
        assert "\n" not in str(e) and flag in str(e)


# -- the untrained memory warning ---------------------------------------------------------------


def test_a_fam_stream_without_a_checkpoint_warns_once(tiny, caplog):
    from endless.fam.state import _warn_untrained
    from endless.stream import Stream

    _warn_untrained.cache_clear()
    with caplog.at_level("WARNING", logger="endless.fam.state"):
        Stream(tiny, "fam:8x1+4")
        Stream(tiny, "fam:8x1+4")
    warned = [r for r in caplog.records if "untrained memory" in r.getMessage()]
    assert len(warned) == 1 and "fam:8x1+4" in warned[0].getMessage()
