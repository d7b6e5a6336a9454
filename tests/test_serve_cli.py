"""`endless serve` refuses bad flags in one line (exit 2) before anything loads."""

import pytest

from endless.cli.main import main


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "argument --port: must be an integer in [0, 65535], got '70000'"),
    (["--policy", "recompute:64"], "cannot decode in a batch"),
    (["--policy", "sinks:prefix+0"], "window must be >= 1"),
    (["--policy", "sinks:4+100", "--fam", "ckpt"], "not both"),
    (["--max-batch", "0"], "argument --max-batch: must be an integer in [1, 4096], got '0'"),
    (["--max-queue", "-1"], "argument --max-queue: must be an integer in [0, 2^30], got '-1'"),
    (["--max-batch", "8", "--max-sessions", "4"], "--max-batch (8) must not exceed --max-sessions (4)"),
    (["--model", "tiny:llama"], "has no tokenizer files"),
    (["--policy", "fam:64x1+16", "--compile-step"], "--compile-step compiles the decode step of a fixed ring"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message, capsys):
    pytest.importorskip("fastapi")
    assert main(["serve", "--threads", "1", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("endless: error: ") and message in lines[0], err
