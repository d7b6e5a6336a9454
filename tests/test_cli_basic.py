"""The CLI frame: the command registry, --help texts, `endless info`, exit codes, one-line errors."""

import argparse
import json
import shutil
import subprocess
import sys

import pytest

from endless.cli import main as main_module
from endless.cli.main import COMMANDS, build_parser, main
from endless.models.tiny import tiny_model
from endless.policies.spec import parse_policy


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model("qwen3", seed=0).save_pretrained(folder)
    return folder


def run_cli(*args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "endless.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=300, input=stdin)
    return proc.returncode, proc.stdout, proc.stderr


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("endless: error: "), err
    return lines[0]


def test_every_command_has_a_module_and_an_explaining_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == COMMANDS
    assert {"info", "demo"} <= set(COMMANDS)
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 40, name
        assert p.get_default("func") is not None, name
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert "usage: endless" in capsys.readouterr().out


def test_usage_error_is_one_line_and_returns_2(capsys):
    assert main(["info", "--dtype", "float16"]) == 2
    assert "argument --dtype: invalid choice: 'float16'" in one_line(capsys.readouterr().err)


def test_info_on_a_tiny_folder(tiny_folder, tmp_path, capsys):
    path = tmp_path / "out" / "info.json"  # its folder is created
    assert main(["info", "--model", str(tiny_folder), "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model_type" in out and "qwen3" in out and "trained_context" in out
    fields = json.loads(path.read_text())
    model = tiny_model("qwen3", seed=0)
    expected = {
        "architecture": "Qwen3ForCausalLM", "model_type": "qwen3", "layers": 2, "hidden_size": 64,
        "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab_size": 128, "trained_context": 256,
        "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
        "weights": str(tiny_folder), "rope_type": "default",
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["rope_theta"] and fields["identity"].startswith("qwen3-2x64-")
    # every JSON result names the machine it was measured on and the command behind it
    assert fields["machine"]["cores"] >= 1 and fields["machine"]["threads"] == 1
    assert fields["machine"]["cpu"] and "torch" in fields["machine"]
    assert fields["command"].startswith("endless ")


def test_write_json_keeps_a_result_s_own_command_and_machine(tmp_path):
    from endless.cli.common import write_json

    write_json(tmp_path / "a.json", {"x": 1, "command": "endless soak --tokens 9", "machine": {"cpu": "c"}})
    assert json.loads((tmp_path / "a.json").read_text()) == {
        "x": 1, "command": "endless soak --tokens 9", "machine": {"cpu": "c"}}


def test_info_kernels_measures_then_shows_the_cached_choice(tiny_folder, tmp_path, capsys, monkeypatch):
    # the suite's private cache is shared: measure into a fresh one so the first call has nothing
    monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path / "cache"))
    args = ["info", "--model", str(tiny_folder), "--threads", "1", "--json", str(tmp_path / "i.json")]
    assert main(args) == 0
    assert "not measured on this machine yet" in json.loads((tmp_path / "i.json").read_text())["kernel"]
    assert main([*args, "--kernels"]) == 0
    measured = json.loads((tmp_path / "i.json").read_text())
    assert measured["kernel"] in ("onednn", "transposed", "linear") or "/" in measured["kernel"]
    assert "ms per token:" in measured["kernel_timings"] and "linear" in measured["kernel_timings"]
    capsys.readouterr()
    assert main(args) == 0  # without --kernels: the cached choice
    assert json.loads((tmp_path / "i.json").read_text())["kernel"] == measured["kernel"]
    assert json.loads((tmp_path / "i.json").read_text())["compiled_step"].startswith(
        "available" if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++") else "the compiled step needs")
    assert main(["generate", "--model", str(tiny_folder), "--threads", "1", "--kernel", "fastest"]) == 2
    assert "argument --kernel: invalid choice" in one_line(capsys.readouterr().err)


def test_info_bfloat16(tiny_folder, tmp_path, capsys):
    assert main(["info", "--model", str(tiny_folder), "--dtype", "bfloat16", "--threads", "1",
                 "--json", str(tmp_path / "i.json")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: "nope-model", "not an embedded name (smollm2-135m)"),
        (lambda p: p / "absent", "nor an existing path"),
        (lambda p: (p / "t.gguf").write_text("not a model") and p / "t.gguf", "not a GGUF file"),
        (lambda p: (p / "e").mkdir() or p / "e", "without config.json"),
    ],
)
def test_bad_model_in_process(tmp_path, capsys, make, words):
    assert main(["info", "--model", str(make(tmp_path)), "--threads", "1"]) == 2
    captured = capsys.readouterr()
    assert words in one_line(captured.err) and captured.out == ""


def test_command_that_needs_a_tokenizer_says_so(tiny_folder):
    from endless.cli.common import add_model_args, load_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--model", str(tiny_folder), "--threads", "1"])
    from endless.errors import EndlessError

    with pytest.raises(EndlessError, match="no tokenizer files"):
        load_from_args(args)
    model, tok = load_from_args(args, need_tokenizer=False)
    assert tok is None and model.config.model_type == "qwen3"


def test_keyboard_interrupt_is_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["endless.cli.info"], "run", interrupted)
    assert main(["info"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_threads_option_sets_torch():
    import torch

    from endless.cli.common import set_threads

    try:
        set_threads(argparse.Namespace(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_unsupported_architecture_through_the_process(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    code, out, err = run_cli("info", "--model", tmp_path, "--threads", "1")
    assert code == 2
    line = one_line(err)
    assert "'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3" in line


def test_truncated_gguf_through_the_process_with_verbose(tmp_path, make_gguf):
    good = make_gguf(tmp_path / "g.gguf")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-8])
    code, out, err = run_cli("-v", "info", "--model", tmp_path / "cut.gguf", "--threads", "1")
    assert code == 2
    assert "truncated GGUF file" in one_line(err)


def test_registry_is_a_list_of_module_names():
    assert isinstance(main_module.COMMANDS, list) and all(isinstance(c, str) for c in COMMANDS)


def test_compile_with_bfloat16_is_one_line_and_exit_2(capsys):
    # refused before anything loads: the compiled kernels only pay off in float32 (endless.gemv)
    assert main(["generate", "hi", "--compile", "--dtype", "bfloat16", "--threads", "1", "--model", "nope"]) == 2
    captured = capsys.readouterr()
    assert "--compile speeds up float32 only" in one_line(captured.err)


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--temperature", "-1"], "argument --temperature: must be a number in [0, 100], got '-1'"),
    (["chat", "--temperature", "nan"], "argument --temperature: must be a number in [0, 100], got 'nan'"),
    (["generate", "hi", "--threads", "0"], "argument --threads: must be an integer in [1, 4096], got '0'"),
])
def test_out_of_range_sampling_and_threads_are_refused_in_one_line(args, message):
    code, out, err = run_cli(*args)
    assert code == 2 and message in one_line(err)


def test_a_fam_stream_without_a_trained_prompt_warns_once(caplog):
    from endless.fam.state import FamState, _warn_untrained
    from endless.models.tiny import tiny_model
    from endless.transformer import Transformer

    _warn_untrained.cache_clear()
    model = Transformer(tiny_model("llama"))
    with caplog.at_level("WARNING", logger="endless.fam.state"):
        FamState(model, parse_policy("fam:8x1+4"))
        FamState(model, parse_policy("fam:8x1+4"))
    assert sum("untrained memory" in r.getMessage() for r in caplog.records) == 1


def test_dtype_auto_is_bfloat16_only_where_this_machine_multiplies_it_fast(monkeypatch):
    import torch

    import endless.cpu
    from endless.cli.common import auto_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(endless.cpu, "onednn_bfloat16", lambda native=native: native)
        assert auto_dtype(cpu) == ("bfloat16" if native else "float32")
        assert auto_dtype(cpu, weights="int8") == "bfloat16"  # int8/int4 weights need bfloat16 activations
        assert auto_dtype(cpu, compile=True) == "float32"  # --compile builds float32 kernels
    assert auto_dtype(cuda) == "bfloat16"


def test_dtype_auto_resolves_before_the_model_loads(tiny_folder, tmp_path):
    import torch

    from endless.cli.common import auto_dtype

    assert main(["info", "--model", str(tiny_folder), "--dtype", "auto", "--threads", "1",
                 "--json", str(tmp_path / "i.json")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["dtype"] == auto_dtype(torch.device("cpu"))
