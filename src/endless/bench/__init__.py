"""``endless bench``: per-token latency, memory and bandwidth, ours side by side with the baselines.

Issue 5. One run measures, on the same weights and text: decode latency per token for our
``sinks``, ``dense`` and ``recompute`` policies and for transformers' own ``DynamicCache``
decoding (and llama.cpp when installed) at several cache lengths, all timed in interleaved steps
so their ratios hold on a loaded machine; sinks latency and peak RSS from 1k to 64k tokens into
the stream; streaming-perplexity throughput, chunked against token-by-token, with the NLL
checked equal; and the machine's copy bandwidth next to the bytes each decode step reads.

    from endless.bench import run_bench, QUICK
    result = run_bench(QUICK)          # a dict; endless.bench.report.render(result) is the text

Modules: ``timing`` (clocks, interleaving, memory, machine), ``bandwidth``, ``decode``,
``positions``, ``ppl``, ``memory`` (isolated peak RSS), ``llamacpp`` (optional), ``runner``,
``report`` (targets and tables), ``plot``. Benchmarks are not tests: nothing here asserts on time.
"""

from __future__ import annotations

__all__ = ["BenchConfig", "QUICK", "SCHEMA", "run_bench"]


def __getattr__(name: str):
    # Lazy, so ``python -m endless.bench.memory`` (the isolated-RSS worker) imports only itself.
    if name in __all__:
        from endless.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'endless.bench' has no attribute {name!r}")
