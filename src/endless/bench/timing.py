"""Clocks, statistics, memory probes and the machine description shared by every benchmark.

Why interleaving: the machines this runs on are shared, and their load changes from one second
to the next. Two implementations timed one after the other see different loads; timed in
alternating steps (``interleave``) they see the same, so their *ratio* is meaningful even when
the absolute times are not. Every ratio the benchmark reports comes from interleaved steps.

Memory is read from ``/proc/self/status``: ``VmRSS`` (now) and ``VmHWM`` (the peak resident set
since the process started, or since ``reset_peak``), with ``getrusage`` as the fallback elsewhere.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable


def stats(seconds: list[float]) -> dict[str, float]:
    """Median and spread of per-step times, in milliseconds."""
    ms = sorted(1000 * s for s in seconds)
    n = len(ms)

    def q(f: float) -> float:
        return ms[min(n - 1, int(f * n))]

    return {
        "median_ms": statistics.median(ms),
        "p10_ms": q(0.10),
        "p90_ms": q(0.90),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "n": n,
    }


def time_calls(fn: Callable[[], object], n: int, *, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleave(steps: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1,
               every: dict[str, int] | None = None, sync: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Time each step once per round, round-robin, starting each round at another step so no
    implementation always runs right after the same one. ``every[name] = k`` runs that step only
    every k-th round (for baselines tens of times slower). ``sync`` waits for queued device work
    (``torch.cuda.synchronize`` on a GPU) inside each timed step, so the clock sees the work."""
    sync = sync or (lambda: None)
    names = list(steps)
    every = every or {}
    for _ in range(warmup):
        for name in names:
            steps[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            if r % every.get(name, 1):
                continue
            sync()
            t = time.perf_counter()
            steps[name]()
            sync()
            out[name].append(time.perf_counter() - t)
    return out


def memory() -> dict[str, float]:
    """Resident set size now and its peak so far, in MB."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    except OSError:
        pass
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"rss_mb": fields.get("VmRSS", peak), "peak_rss_mb": peak}


def reset_peak() -> bool:
    """Restart the peak (``VmHWM``) from the current RSS (Linux ``clear_refs``); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, object]:
    """What the numbers were measured on: CPU, cores, ISA features that matter, load, versions."""
    import torch
    import transformers

    cpu, flags, ids = platform.processor() or "unknown", set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and cpu in ("unknown", "", "x86_64"):
                    cpu = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                elif key in ("cpu family", "model") and key not in ids:
                    # under a hypervisor the name can be as bare as "AMD EPYC" for Zen 3 and Zen 5
                    # alike; family and model tell them apart (25/1: Zen 3, 26: Zen 5)
                    ids[key] = value.strip()
                if key == "processor" and ids and flags:
                    break  # the first CPU says it all
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cpu": cpu,
        "cpu_family": ids.get("cpu family", ""),
        "cpu_model": ids.get("model", ""),
        "cores": os.cpu_count(),
        "isa": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni")),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "load_average": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
