"""Before/after timing of two source trees of endless, interleaved on one machine.

Usage (from the repository root, with the package's venv):

    python benchmarks/arch/scripts/ab.py --before /path/to/old/checkout --after . \
        --rounds 3 --out benchmarks/arch/results/ab

Each round runs, for the "before" tree and then the "after" tree (each in its own process, its
``src`` first on PYTHONPATH): ``endless bench`` on caches 256 and 1024 in float32 and bfloat16 (decode
latency of sinks, dense and recompute per token, chunked vs token-by-token perplexity speed; no
transformers, llama.cpp or compiled kernels: only our own path, which is what changed) and
``endless eval fam-cost`` (FAM and BSWA per decoded token and per prefilled block). Rounds
alternate the trees (odd rounds run "after" first) so both see the same machine load, or with
``--together`` run both trees at the same time, each in its own process; the summary
gives the ratio of the medians over rounds and, more robust when the load changes between rounds,
the median of the per-round ratios, after / before (below 1: the after tree is faster). Writes ``OUT.json``, ``OUT.txt`` and
``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(tree: Path, args: list[str], threads: int) -> dict:
    return _run_together({"one": tree}, args, threads)["one"]


def _run_together(trees: dict[str, Path], args: list[str], threads: int) -> dict[str, dict]:
    """One ``endless`` command per tree, all started at once; their JSON results by name."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for name, tree in trees.items():
            out = Path(tmp) / f"{name}.json"
            env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(threads)}
            cmd = [sys.executable, "-m", "endless.cli.main", *args, "--threads", str(threads), "--json", str(out)]
            procs[name] = (subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL), out)
        for name, (proc, _) in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"{name}: {' '.join(args[:2])} failed with exit code {proc.returncode}")
        return {name: json.loads(out.read_text()) for name, (_, out) in procs.items()}


def _figures(bench: dict, famcost: dict) -> dict[str, float]:
    """Flat name -> value (ms per token, or tokens/s for throughputs) of one round."""
    out: dict[str, float] = {}
    for dtype, run in bench["runs"].items():
        for cell in run["decode"]:
            for impl, r in cell["impls"].items():
                out[f"{dtype} decode {impl} cache {cell['cache']} (ms)"] = r["median_ms"]
        ppl = run["ppl"]
        out[f"{dtype} chunked ppl (tok/s)"] = ppl["chunked"]["tokens_per_s"]
        out[f"{dtype} token-by-token ppl (tok/s)"] = ppl["token_by_token"]["tokens_per_s"]
    for row in famcost["results"]:
        out[f"float32 {row['mode']} {row['policy']} (ms/token)"] = row["ms_per_token"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per cell and round")
    p.add_argument("--together", action="store_true",
                   help="run the two trees at the same time (one process each) instead of one after the other: "
                        "for a machine whose load changes while the comparison runs (needs 2 x --threads cores)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(a.rounds):
        # odd rounds run "after" first: a load that drifts within a round then favours neither tree
        bench_args = ["bench", "--dtype", "both", "--caches", "256,1024", "--positions", "1024", "--window", "252",
                      "--rounds", str(a.steps), "--ppl-tokens", "512", "--no-transformers", "--no-llamacpp",
                      "--no-isolated-rss", "--no-compile"]
        famcost_args = ["eval", "fam-cost", "--rounds", "4", "--warmup", "256"]
        if a.together:
            # both trees at the same time, one process each: whatever else loads the machine
            # loads both alike, which running them one after the other cannot promise
            bench, famcost = _run_together(trees, bench_args, a.threads), _run_together(trees, famcost_args, a.threads)
            for name in trees:
                rounds[name].append(_figures(bench[name], famcost[name]))
            print(f"round {r + 1} done (together)", flush=True)
        else:
            order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
            for name, tree in order:
                rounds[name].append(_figures(_run(tree, bench_args, a.threads), _run(tree, famcost_args, a.threads)))
                print(f"round {r + 1} {name} done", flush=True)
        _write(a, trees, rounds, final=r + 1 == a.rounds)  # every finished round is kept
    return 0


def _write(a: argparse.Namespace, trees: dict[str, Path], rounds: dict[str, list[dict[str, float]]], *, final: bool) -> None:
    """Summary of the rounds so far as OUT.json / OUT.txt (and OUT.png once all have run)."""
    keys = [k for k in rounds["before"][0] if all(k in x for x in rounds["before"] + rounds["after"])]
    summary = {}
    for k in keys:
        b = statistics.median(x[k] for x in rounds["before"])
        f = statistics.median(x[k] for x in rounds["after"])
        # the ratio within each round (its two runs minutes apart), then the median over rounds:
        # robust to load that changes between rounds, which the ratio of medians is not
        paired = statistics.median(x[k] / y[k] for x, y in zip(rounds["after"], rounds["before"], strict=True))
        summary[k] = {"before": b, "after": f, "after/before": f / b, "paired after/before": paired}
    machine = {"cpu": _cpu(), "python": platform.python_version(), "threads": a.threads}
    result = {"command": " ".join(["python", *sys.argv]), "machine": machine, "trees": {k: str(v) for k, v in trees.items()},
              "rounds_done": len(rounds["after"]), "rounds": rounds, "summary": summary}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"{'figure':58s} {'before':>10s} {'after':>10s} {'after/before':>13s} {'paired':>7s}"]
    lines += [f"{k:58s} {v['before']:10.3f} {v['after']:10.3f} {v['after/before']:13.3f} {v['paired after/before']:7.3f}"
              for k, v in summary.items()]
    a.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    if final:
        print("\n".join(lines))
        _plot(summary, a.out.with_suffix(".png"))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(names) + 1.2))
    ax.barh(range(len(names)), [summary[n]["paired after/before"] for n in names], color="tab:blue")
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("after / before (median of per-round ratios; ms: lower is faster, tok/s: higher is faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
