"""The benchmark's figure: latency against cache size, and against stream position."""

from __future__ import annotations

from pathlib import Path

from endless.bench.report import UNCOMPILED, cpu_name

STYLE = {"float32": "-", "bfloat16": "--"}
COLORS = {"sinks": "C0", UNCOMPILED: "C8", "dense": "C1", "recompute": "C3", "transformers": "C2", "llama.cpp": "C4", "llama.cpp Q4_1": "C5"}


def _tokens(x: float, _pos=None) -> str:
    """Tick labels like 256, 4k, 64k."""
    return f"{x / 1024:g}k" if x >= 1024 and x % 1024 == 0 else f"{x:g}"


def plot(result: dict, path: "str | Path") -> None:
    """Two panels, written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from endless.files import save_png

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for dtype, run in result["runs"].items():
        caches = [c["cache"] for c in run["decode"]]
        for name, color in COLORS.items():
            ys = [c["impls"][name]["median_ms"] if name in c["impls"] else None for c in run["decode"]]
            pts = [(x, y) for x, y in zip(caches, ys, strict=True) if y is not None]
            if pts:
                label = f"{name} {dtype}" + (" (compiled)" if name == "sinks" and run.get("compiled_matrices") else "")
                a.plot(*zip(*pts, strict=True), STYLE.get(dtype, ":"), marker="o", color=color, label=label)
        rows = run["positions"]["checkpoints"]
        xs = [r["position"] for r in rows]
        b.errorbar(xs, [r["decode"]["median_ms"] for r in rows],
                   yerr=[[r["decode"]["median_ms"] - r["decode"]["p10_ms"] for r in rows],
                         [r["decode"]["p90_ms"] - r["decode"]["median_ms"] for r in rows]],
                   fmt=STYLE.get(dtype, ":") + "o", color="C0" if dtype == "float32" else "C9", capsize=3,
                   label=f"sinks {dtype} ({run['positions']['policy']})")
        b.plot(xs, [r["control"]["median_ms"] for r in rows], STYLE.get(dtype, ":"), color="grey",
               label=f"control stream near {run['positions']['control_position']}, {dtype} (same moments)")
    a.set(xscale="log", yscale="log", xlabel="cache length (tokens attended)", ylabel="ms per decoded token",
          title="Decode latency vs cache size")
    a.legend(fontsize=7, ncol=2)
    a.grid(True, which="both", alpha=0.3)
    b.set(xscale="log", xlabel="stream position (tokens read)", ylabel="ms per decoded token",
          title="Sinks decode latency vs stream position")
    b.set_ylim(bottom=0)
    b.legend(fontsize=7)
    b.grid(True, alpha=0.3)
    first = next(iter(result["runs"].values()))
    for axis, ticks in ((a, [c["cache"] for c in first["decode"]]),
                        (b, [r["position"] for r in first["positions"]["checkpoints"]])):
        axis.set_xticks(ticks)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_tokens))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    mach = result["machine"]
    fig.suptitle(f"endless bench: {result['config']['model']}, {cpu_name(mach)}, {mach['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
