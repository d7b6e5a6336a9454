"""Tables and target checks of benchmarks/sink-pretrain from its results/*.json (issue 23,
"Efficient Streaming Language Models with Attention Sinks", section 3.3, Table 3).

Prints Markdown: streaming perplexity per variant and sink count, the issue's targets met or not,
and the training-loss comparison; draws results/loss.png. Run from the repository root:
``python benchmarks/sink-pretrain/scripts/summarize.py``."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

B = Path(__file__).resolve().parents[1]
R = B / "results"
VARIANTS = ("vanilla", "zero-sink", "learnable-sink")
TEXTS = ("kjv-heldout", "shakespeare-heldout")
CACHE = 128
SINKS = (0, 1, 2, 4, 8)


def ppl_table(name: str) -> dict[str, float]:
    data = json.loads((R / name).read_text())
    return {r["policy"]: r["ppl"] for r in data["results"]}


def row(label: str, ppl: dict[str, float]) -> str:
    cells = [f"{ppl.get(f'sinks:{s}+{CACHE - s}', math.nan):.3f}" for s in SINKS]
    nl = next((v for k, v in ppl.items() if "sink=#" in k), math.nan)
    return f"| {label} | " + " | ".join(cells) + f" | {nl:.3f} |"


def main() -> None:
    head = "| model | " + " | ".join(f"{s}+{CACHE - s}" for s in SINKS) + " | 4 newlines+124 |"
    sep = "|---" * (len(SINKS) + 2) + "|"
    tables = {}
    for text in TEXTS:
        print(f"\n**{text}**, 4096 bytes, streaming perplexity (bytes), cache {CACHE}:\n")
        print(head)
        print(sep)
        for v in VARIANTS:
            f = R / f"sinks-{v}-{text}.json"
            if not f.is_file():
                continue
            tables[(v, text)] = t = ppl_table(f.name)
            print(row(v + (" (sink token 259 prepended)" if v == "learnable-sink" else ""), t))
            g = R / f"sinks-{v}-noprefix-{text}.json"
            if g.is_file():
                print(row(v + " (no sink token)", ppl_table(g.name)))

    print("\n**Targets**\n")
    p = lambda v, t, s: tables[(v, t)][f"sinks:{s}+{CACHE - s}"]  # noqa: E731
    for text in TEXTS:
        if ("vanilla", text) in tables:
            r = p("vanilla", text, 0) / p("vanilla", text, 4)
            print(f"- {text}: vanilla 0+{CACHE} / 4+{CACHE - 4} = {r:.2f} (target >= 1.5: {'met' if r >= 1.5 else 'NOT met'})")
        if ("learnable-sink", text) in tables and ("vanilla", text) in tables:
            own = p("learnable-sink", text, 1) / p("learnable-sink", text, 4)
            van = p("learnable-sink", text, 1) / p("vanilla", text, 4)
            ok = abs(own - 1) <= 0.05 and abs(van - 1) <= 0.05
            print(f"- {text}: learnable sink 1+{CACHE - 1} / its own 4+{CACHE - 4} = {own:.3f}, / vanilla 4+{CACHE - 4} = "
                  f"{van:.3f} (target: both within 5 %: {'met' if ok else 'NOT met'})")
        if ("zero-sink", text) in tables:
            r = [p("zero-sink", text, s) / p("zero-sink", text, 4) for s in (0, 1, 2)]
            print(f"- {text}: zero sink 0+, 1+, 2+ / 4+{CACHE - 4} = " + ", ".join(f"{x:.3f}" for x in r) + " (as measured)")

    runs = {v: json.loads((R / f"train-{v}.json").read_text()) for v in VARIANTS if (R / f"train-{v}.json").is_file()}
    if runs:
        print("\n**Training** (same data order, steps, schedule, seed; loss in nats per byte at the training length)\n")
        print("| variant | steps | minutes | mean loss, last 200 steps | held-out loss | paired diff. to vanilla, last 200 (± 2 s.e.) |")
        print("|---|---|---|---|---|---|")
        base = runs.get("vanilla")
        for v, r in runs.items():
            last = r["loss"][-200:]
            diff = ""
            if base is not None and v != "vanilla":
                d = [a - b for a, b in zip(last, base["loss"][-200:])]
                se = statistics.stdev(d) / math.sqrt(len(d))
                diff = f"{statistics.mean(d):+.4f} ± {2 * se:.4f}"
            print(f"| {v} | {r['steps']} | {r['seconds'] / 60:.1f} | {statistics.mean(last):.4f} | "
                  f"{r['heldout_loss']:.4f} | {diff} |")
        _plot(runs)


def _plot(runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for v, r in runs.items():
        y = r["loss"]
        k = 25
        smooth = [statistics.mean(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]
        ax.plot(range(1, len(y) + 1), smooth, lw=1.2, label=f"{v} (held-out {r['heldout_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte, mean of 25 steps)")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.set_title("Pre-training with a sink: loss at the training length (256)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(R / "loss.png", dpi=110)


if __name__ == "__main__":
    main()
