"""Peak resident memory of one implementation at one cache length, each in its own process.

A process's peak RSS only goes up, so peaks of several configurations measured in one process
say nothing about each one. Here every (dtype, implementation, cache length) runs in a fresh
``python -m endless.bench.memory SPEC`` that loads the model, builds the state, prefills,
decodes a few tokens and prints its memory as JSON: ``baseline`` after loading (and packing)
the weights, ``peak`` at the end (restarted after loading, so the loader's own transient peak
does not hide the policy's), and their difference, what the policy itself costs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def measure(spec: dict, *, timeout: float = 1800) -> dict:
    """Run one isolated measurement; ``spec`` has model, dtype, impl, cache, steps, threads."""
    proc = subprocess.run([sys.executable, "-m", "endless.bench.memory", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": tail[:200]}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _worker(spec: dict) -> dict:
    from endless.bench.decode import HFDecoder, OursDecoder
    from endless.bench.timing import memory, reset_peak
    from endless.models import load
    from endless.transformer import Transformer

    torch.set_num_threads(spec["threads"])
    hf, _ = load(spec["model"], dtype=spec["dtype"])
    length, impl = spec["cache"], spec["impl"]
    # transformers runs as a user would run it: no packed copy of the weights in its process
    model = None if impl == "transformers" else Transformer(hf, pack=spec.get("pack", True))
    ids = torch.randint(0, hf.config.vocab_size, (length + spec["steps"] + 8,),
                        generator=torch.Generator().manual_seed(0))
    import gc

    gc.collect()
    peak_reset = reset_peak()  # loading and packing have their own peak; measure the policy's
    base = memory()
    if impl == "transformers":
        dec = HFDecoder(hf, ids, length)
    else:
        policy = {"sinks": f"sinks:4+{length - 4}", "dense": "dense", "recompute": f"recompute:{length}"}[impl]
        dec = OursDecoder(model, policy, ids, length)
    for _ in range(spec["steps"]):
        dec.step()
    end = memory()
    return {
        "baseline_rss_mb": base["rss_mb"],
        "peak_rss_mb": end["peak_rss_mb"],
        "rss_mb": end["rss_mb"],
        "policy_peak_mb": end["peak_rss_mb"] - base["rss_mb"],
        "peak_reset": peak_reset,
        "state_bytes": dec.state_bytes(),
    }


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
