"""Time of one ``train fam`` step (forward and backward of the parallel schedule) with the windowed
attention as einsum products against PyTorch's fused ``scaled_dot_product_attention``.

Both forms run on the same weights and the same PassKey batch in one process, alternating, so the
machine's drift hits both alike; the loss and the gradients of the two are compared too. Peak memory
is measured apart: one fresh process per (policy, form) runs two steps and reports its maximum RSS.

    python benchmarks/fam-train-step/scripts/step.py --policies P1 P2 ... --length N --reps R \
        --threads T --json OUT.json --plot OUT.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from endless.bench.timing import machine


def setup(policy: str, length: int):
    from endless.data.passkey import collate
    from endless.models import load
    from endless.train.fam import FamTrainConfig, Sampler, build

    cfg = FamTrainConfig(policy=policy, min_len=length, max_len=length, seed=5)
    hf, tok = load(cfg.model, dtype="float32")
    module = build(cfg, hf, tok)
    module.train()
    ids, targets = collate(Sampler(cfg, tok, 0).batch(length), pad=0)
    return module, ids, targets


def step(module, ids, targets, fused: bool) -> tuple[float, float, torch.Tensor]:
    """(seconds, loss, flat gradient) of one forward and backward pass."""
    from endless.device import fused_window_attention

    for p in module.parameters():
        p.grad = None
    os.environ["ENDLESS_FUSED_ATTENTION"] = "1" if fused else "0"  # read by parallel_forward's default
    assert fused_window_attention() is fused
    t = time.perf_counter()
    loss, _ = module(ids, targets)
    loss.backward()
    seconds = time.perf_counter() - t
    grad = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return seconds, loss.item(), grad


def peak(policy: str, length: int, fused: bool, threads: int) -> float:
    """Peak RSS (GB, 1e6 kB) of two steps of one form, in a fresh process, counted from after the model
    is loaded (its GGUF dequantised would hide the steps' peak otherwise)."""
    code = (f"import sys, torch; torch.set_num_threads({threads}); "
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import step; "
            f"from endless.bench.timing import memory, reset_peak; "
            f"m, i, t = step.setup({policy!r}, {length}); assert reset_peak(); "
            f"step.step(m, i, t, {fused}); step.step(m, i, t, {fused}); print(memory()['peak_rss_mb'] * 1024 / 1e6)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", required=True)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for policy in args.policies:
        module, ids, targets = setup(policy, args.length)
        times: dict[bool, list[float]] = {False: [], True: []}
        step(module, ids, targets, False), step(module, ids, targets, True)  # warm-up
        for _ in range(args.reps):
            for fused in (False, True):
                times[fused].append(step(module, ids, targets, fused)[0])
        (_, l0, g0), (_, l1, g1) = step(module, ids, targets, False), step(module, ids, targets, True)
        row = {"policy": policy, "length": ids.shape[1],
               "einsum_s": [round(x, 3) for x in times[False]], "fused_s": [round(x, 3) for x in times[True]],
               "einsum_median_s": round(statistics.median(times[False]), 3),
               "fused_median_s": round(statistics.median(times[True]), 3),
               "speedup_median": round(statistics.median(times[False]) / statistics.median(times[True]), 3),
               "loss_einsum": l0, "loss_fused": l1, "grad_rel_diff": ((g0 - g1).norm() / g0.norm()).item()}
        if not args.no_memory:
            row["einsum_peak_gb"] = round(peak(policy, args.length, False, args.threads), 2)
            row["fused_peak_gb"] = round(peak(policy, args.length, True, args.threads), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del module
    result = {"command": "python " + " ".join(sys.argv), "threads": args.threads, "torch": torch.__version__,
              "machine": machine(), "rows": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(rows))
    for dx, key, label in ((-0.2, "einsum_s", "einsum products"), (0.2, "fused_s", "fused SDPA")):
        med = [statistics.median(r[key]) for r in rows]
        lo = [m - min(r[key]) for m, r in zip(med, rows, strict=True)]
        hi = [max(r[key]) - m for m, r in zip(med, rows, strict=True)]
        ax.bar([i + dx for i in x], med, 0.4, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(list(x), [r["policy"].split(",")[0] for r in rows])
    ax.set_ylabel("seconds per training step (median, min-max)")
    ax.set_title(f"train fam step, SmolLM2-135M, {rows[0]['length']} tokens, {result['threads']} thread(s)\n"
                 f"{result['machine']['cpu']}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
