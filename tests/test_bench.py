"""``endless bench`` smoke run on a tiny random model: the JSON has every figure (never timed)."""

import json

import pytest

from endless.bench.report import ceiling, targets_table
from endless.cli.main import main

TINY = ["--quick", "--model", "tiny:llama:2", "--caches", "24,40", "--positions", "48,120", "--window", "20",
        "--rounds", "3", "--ppl-tokens", "30", "--no-llamacpp", "--compile"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", *TINY, "--json", str(out / "r.json"), "--plot", str(out / "r.png")]) == 0
    assert (out / "r.png").stat().st_size > 1000
    return json.loads((out / "r.json").read_text())


def test_top_level_schema(result):
    assert result["schema"] == "endless-bench/1"
    assert {"config", "machine", "bandwidth", "runs", "targets", "seconds"} <= set(result)
    assert result["machine"]["threads"] == 1 and result["config"]["threads"] == 1
    assert result["bandwidth"]["copy_gbs"] > 0 and result["bandwidth"]["read_gbs"] > 0
    assert list(result["runs"]) == ["float32"]


def test_decode_cells_have_every_implementation(result):
    run = result["runs"]["float32"]
    cells = run["decode"]
    assert [c["cache"] for c in cells] == [24, 40]
    # --compile: sinks runs the compiled one-token kernels, timed beside the uncompiled path
    # (none when this machine cannot compile: then only the packed path runs)
    compiled = run["compiled_matrices"] > 0
    assert run["compiled_matrices"] in (0, 4 * 2 + 1)
    for c in cells:
        assert set(c["impls"]) == {"sinks", "dense", "recompute", "transformers"} | ({"sinks uncompiled"} if compiled else set())
        for r in c["impls"].values():
            assert {"median_ms", "p10_ms", "p90_ms", "n", "tokens_per_s", "bytes_per_token", "gb_per_s"} <= set(r)
            assert r["n"] >= 1 and r["median_ms"] > 0
        assert set(c["ratios"]) == {"dense/sinks", "recompute/sinks", "transformers/sinks"} | (
            {"sinks uncompiled/sinks"} if compiled else set())


def test_positions_and_perplexity(result):
    run = result["runs"]["float32"]
    rows = run["positions"]["checkpoints"]
    assert [r["position"] for r in rows] == [48, 120]
    assert all(r["peak_rss_mb"] > 0 and r["ratio_to_control"] > 0 for r in rows)
    ppl = run["ppl"]
    assert ppl["tokens"] == 30
    # Chunked evaluation is exact: the same NLL as token by token (a correctness check, not timing).
    assert ppl["max_abs_logprob_diff"] <= 1e-4


def test_targets_are_listed(result):
    names = [t["target"] for t in result["targets"]]
    assert any(n.startswith("sinks latency at position 120") for n in names)
    assert any(n.startswith("transformers / sinks at cache 40") for n in names)
    assert any(n.startswith("chunked / token-by-token") for n in names)


def test_transformers_ratio_names_its_ceiling():
    """The bound a memory bus puts on transformers / sinks: transformers' time over the time to read
    a token's bytes once (2 GB at 10 GB/s: 200 ms; transformers 300 ms: at most 1.50)."""
    cell = {"impls": {"sinks": {"bytes_per_token": 2e9, "median_ms": 250.0}, "transformers": {"median_ms": 300.0}}}
    assert ceiling(cell, 10.0).startswith("at most 1.50 on this machine: reading a token's 2000 MB once")
    assert ceiling({"impls": {"sinks": {"bytes_per_token": 1}}}, 10.0) == ""
    # and the printed targets table carries it (stdout, the README's table), not the JSON alone
    row = {"target": "transformers / sinks", "dtype": "float32", "measured": 1.2, "goal": ">= 1.5", "met": False,
           "how": ceiling(cell, 10.0)}
    assert targets_table([row]).splitlines()[-1].endswith("| **no** | " + ceiling(cell, 10.0) + " |")


def test_isolated_memory_worker():
    from endless.bench.memory import measure

    r = measure({"model": "tiny:llama:2", "dtype": "float32", "impl": "sinks", "cache": 24, "threads": 1, "steps": 2})
    assert "error" not in r, r
    assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0 and r["state_bytes"] > 0


def test_bad_options_are_one_line_errors(capsys):
    assert main(["bench", "--quick", "--positions", "10", "--window", "20"]) == 2
    assert "exceed the window" in capsys.readouterr().err
