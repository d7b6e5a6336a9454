"""CLI behaviour: help, bad input (one line, exit 2, no traceback), and the real model."""

import json
import subprocess
import sys

import pytest

from endless.cli.main import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "endless.cli.main", *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "chat", "verify", "info"):
        assert cmd in out


@pytest.mark.parametrize(
    "args,words",
    [
        (["generate", "", "--model", "nope"], "empty prompt"),
        (["generate", "hi", "--model", "/no/such/path"], "nor an existing path"),
        (["generate", "hi", "--policy", "sinks:8+4"], "smaller than the window"),
        (["generate", "hi", "--policy", "window:4+100"], "has no sinks"),
        (["verify", "--policy", "fancy:1"], "valid policies"),
        (["info", "--model", "missing-model"], "not an embedded name"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words):
    code, out, err = run_cli(*args)
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], err


def test_non_utf8_prompt_on_stdin():
    p = subprocess.run([sys.executable, "-m", "endless.cli.main", "generate", "-"], input=b"\xff\xfe oops",
                       capture_output=True, timeout=120)
    assert p.returncode == 2 and b"not UTF-8" in p.stderr and b"Traceback" not in p.stderr


def test_chat_help_says_evicted_text_is_forgotten(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "FORGOTTEN" in capsys.readouterr().out


@pytest.mark.real
def test_verify_and_generate_on_the_embedded_model(tmp_path):
    code, out, err = run_cli("verify", "--policy", "sinks:4+28", "--tokens", "80", "--threads", "1", "--json", str(tmp_path / "v.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["ok"] and result["max_abs_diff"] <= 2e-4 and result["checks"][0]["max_abs_diff"] <= 1e-4
    code, out, err = run_cli("generate", "The capital of France is", "--policy", "sinks:4+12",
                             "--max-new-tokens", "40", "--no-stop", "--threads", "1")
    assert code == 0, err
    assert "Paris" in out


@pytest.mark.real
def test_chat_session_resumes(tmp_path):
    session = tmp_path / "chat.st"
    args = ["chat", "--session", str(session), "--max-new-tokens", "8", "--threads", "1", "--policy", "sinks:4+252"]
    p = subprocess.run([sys.executable, "-m", "endless.cli.main", *args], input="What is 2+2?\n", capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert session.exists()
    p = subprocess.run([sys.executable, "-m", "endless.cli.main", *args], input="And 3+3?\n", capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "resumed" in p.stderr and "2 messages" in p.stderr, p.stderr
    session.write_bytes(session.read_bytes()[:100])
    p = subprocess.run([sys.executable, "-m", "endless.cli.main", *args], input="hi\n", capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr
