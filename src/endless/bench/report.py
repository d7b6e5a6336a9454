"""The issue's targets as pass/fail lines, and the human-readable tables of a benchmark result.

Targets (issue 5), all ratios measured in one run:

- sinks per-token latency at the last stream position / at ~1k: <= 1.05; peak RSS equal within 1%;
- recompute / sinks at cache 1024: >= 30; at cache 4096: >= 100;
- transformers / sinks at the same cache length: >= 1.5 (stretch: bfloat16 sinks <= llama.cpp), with
  the most any path could reach on the machine (``ceiling``: transformers' time over the time to read
  a token's bytes once at the measured read bandwidth);
- chunked / token-by-token streaming perplexity: >= 20x faster, max |dlogprob| <= 1e-4 (float32);
- decode GB/s, reported against the measured copy bandwidth (no threshold);
- with ``--weights int8`` (issue 21): int8 / bfloat16 sinks per-token time <= 0.6 at each cache;
  with ``int4``, the same ratio for int4 weights against the same goal, and int4 sinks against
  llama.cpp on the shipped Q4_1 file (the same 4-bit grid) when llama.cpp runs.
"""

from __future__ import annotations

UNCOMPILED = "sinks uncompiled"  # the packed eager path, timed beside compiled products (endless.gemv) or step (endless.step)
INT8 = "sinks int8"  # bfloat16 activations with int8 weights (endless.int8, issue 21), beside bfloat16 sinks
INT4 = "sinks int4"  # the same with int4 weights in groups of 32 (endless.int4)


def _t(name: str, dtype: str, measured: float | None, goal: str, met: bool | None, how: str = "") -> dict:
    return {"target": name, "dtype": dtype, "measured": measured, "goal": goal, "met": met, "how": how}


def ceiling(cell: dict, read_gbs: float) -> str:
    """The largest transformers / sinks any path could reach in ``cell`` on this machine: a decoded
    token reads at least its weights and cache once (``bytes_per_token``), so it takes at least
    that many bytes over the measured read bandwidth; transformers' token time over that floor
    bounds the ratio (a target above it asks for more than the memory bus gives)."""
    sinks, hf = cell["impls"]["sinks"], cell["impls"].get("transformers")
    if hf is None or not read_gbs:
        return ""
    floor_ms = sinks["bytes_per_token"] / (read_gbs * 1e9) * 1e3
    return (f"at most {hf['median_ms'] / floor_ms:.2f} on this machine: reading a token's {sinks['bytes_per_token'] / 1e6:.0f} MB "
            f"once at the measured {read_gbs:.1f} GB/s takes {floor_ms:.1f} ms, transformers' token {hf['median_ms']:.1f} ms")


def targets(result: dict) -> list[dict]:
    """One line per target and dtype (``met`` None where there is no threshold or no data)."""
    out = []
    read_bw = result["bandwidth"]["read_gbs"]
    for dtype, run in result["runs"].items():
        pos = run["positions"]
        first, last = pos["checkpoints"][0], pos["checkpoints"][-1]
        r = last["ratio_to_control"]
        out.append(_t(f"sinks latency at position {last['position']} / at ~{pos['control_position']}", dtype, r,
                      "<= 1.05", r <= 1.05,
                      f"interleaved with a control stream of {pos['policy']} kept near position {pos['control_position']}; "
                      f"against its own first checkpoint ({first['position']}): {pos['last_over_first']:.3f}"))
        ch = pos["peak_rss_change"]
        out.append(_t(f"peak RSS at {last['position']} vs at {first['position']}", dtype, ch, "abs change <= 1%",
                      abs(ch) <= 0.01, f"{first['peak_rss_mb']:.1f} -> {last['peak_rss_mb']:.1f} MB"))
        cells = {c["cache"]: c for c in run["decode"]}
        for cache, goal in ((1024, 30.0), (4096, 100.0)):
            ratio = cells.get(cache, {}).get("ratios", {}).get("recompute/sinks")
            out.append(_t(f"recompute / sinks at cache {cache}", dtype, ratio, f">= {goal:g}",
                          None if ratio is None else ratio >= goal, "" if ratio is not None else "not measured"))
        for cache, c in cells.items():
            ratio = c["ratios"].get("transformers/sinks")
            if ratio is not None:
                out.append(_t(f"transformers / sinks at cache {cache}", dtype, ratio, ">= 1.5", ratio >= 1.5,
                              ceiling(c, read_bw)))
            ratio = c["ratios"].get(f"{INT8}/sinks")
            if ratio is not None:
                out.append(_t(f"int8 / {dtype} sinks at cache {cache}", dtype, ratio, "<= 0.6", ratio <= 0.6,
                              "int8 weights, bfloat16 activations (endless.int8), interleaved with the bfloat16 path"))
            ratio = c["ratios"].get(f"{INT4}/sinks")
            if ratio is not None:
                out.append(_t(f"int4 / {dtype} sinks at cache {cache}", dtype, ratio, "<= 0.6", ratio <= 0.6,
                              "int4 weights in groups of 32, bfloat16 activations (endless.int4), interleaved"))
                cpp = c["impls"].get("llama.cpp Q4_1")
                if cpp is not None:
                    r = c["impls"][INT4]["median_ms"] / cpp["median_ms"]
                    out.append(_t(f"int4 sinks / llama.cpp Q4_1 at cache {cache}", dtype, r, "<= 1.0", r <= 1.0,
                                  "our int4 weights against llama.cpp on the shipped Q4_1 GGUF"))
            for cpp_name, how in (("llama.cpp Q4_1", "llama.cpp on the shipped Q4_1 GGUF (4.5 bits per weight)"),
                                  ("llama.cpp", f"llama.cpp on the same weights in {dtype}")):
                cpp = c["impls"].get(cpp_name)
                if cpp is not None:
                    ratio = c["impls"]["sinks"]["median_ms"] / cpp["median_ms"]
                    out.append(_t(f"stretch: sinks / {cpp_name} at cache {cache}", dtype, ratio, "<= 1.0",
                                  ratio <= 1.0, how))
        ppl = run["ppl"]
        out.append(_t("chunked / token-by-token perplexity speed", dtype, ppl["speedup"], ">= 20",
                      ppl["speedup"] >= 20, f"{ppl['tokens']} tokens, {ppl['policy']}, chunk {ppl['chunk']}"))
        diff = ppl["max_abs_logprob_diff"]
        exact = diff <= 1e-4 if dtype == "float32" else None
        out.append(_t("chunked vs token-by-token max abs dlogprob", dtype, diff, "<= 1e-4 (float32)", exact,
                      f"NLL {ppl['chunked']['nll']:.6f} vs {ppl['token_by_token']['nll']:.6f}"))
        for cache, c in cells.items():
            gbs = c["impls"]["sinks"]["gb_per_s"]
            out.append(_t(f"sinks decode GB/s at cache {cache}", dtype, gbs, "report vs read bandwidth", None,
                          f"{gbs / read_bw:.0%} of the measured read bandwidth {read_bw:.1f} GB/s"))
    return out


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def decode_table(result: dict) -> str:
    """Markdown: per-token latency of every implementation at every cache length."""
    names = ["sinks", UNCOMPILED, INT8, INT4, "dense", "recompute", "transformers", "llama.cpp", "llama.cpp Q4_1"]
    present = {n for run in result["runs"].values() for c in run["decode"] for n in c["impls"]}
    names = [n for n in names if n in present or n in ("sinks", "dense", "recompute", "transformers")]
    lines = ["| dtype | cache | " + " | ".join(f"{n} ms" for n in names)
             + " | recompute/sinks | transformers/sinks | sinks tok/s | sinks GB/s |",
             "|---|---:|" + "---:|" * (len(names) + 4)]
    for dtype, run in result["runs"].items():
        for c in run["decode"]:
            imp = c["impls"]
            med = [_fmt(imp[n]["median_ms"]) if n in imp else "-" for n in names]
            lines.append(f"| {dtype} | {c['cache']} | " + " | ".join(med)
                         + f" | {_fmt(c['ratios'].get('recompute/sinks'))} | {_fmt(c['ratios'].get('transformers/sinks'), '.2f')}"
                         + f" | {_fmt(imp['sinks']['tokens_per_s'])} | {_fmt(imp['sinks']['gb_per_s'])} |")
    return "\n".join(lines)


def positions_table(result: dict) -> str:
    lines = ["| dtype | position | sinks ms | control ms | ratio | peak RSS MB |", "|---|---:|---:|---:|---:|---:|"]
    for dtype, run in result["runs"].items():
        for row in run["positions"]["checkpoints"]:
            lines.append(f"| {dtype} | {row['position']} | {row['decode']['median_ms']:.1f} | "
                         f"{row['control']['median_ms']:.1f} | {row['ratio_to_control']:.3f} | {row['peak_rss_mb']:.1f} |")
    return "\n".join(lines)


def memory_table(result: dict) -> str:
    lines = ["| dtype | impl | cache | peak RSS MB | over weights MB | state MB |", "|---|---|---:|---:|---:|---:|"]
    for dtype, run in result["runs"].items():
        for m in run.get("memory", []):
            if "error" in m:
                lines.append(f"| {dtype} | {m['impl']} | {m['cache']} | error: {m['error']} | | |")
                continue
            lines.append(f"| {dtype} | {m['impl']} | {m['cache']} | {m['peak_rss_mb']:.1f} | "
                         f"{m['policy_peak_mb']:.1f} | {m['state_bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def targets_table(rows: list[dict]) -> str:
    """The targets as a Markdown table, each row's ``how`` (what was compared, the ceiling this
    machine allows, why a row was not measured) in its last column."""
    lines = ["| target | dtype | measured | goal | met | how |", "|---|---|---:|---|---|---|"]
    for r in rows:
        m = r["measured"]
        val = "-" if m is None else (f"{m:.2%}" if "RSS" in r["target"] else f"{m:.3g}")
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['target']} | {r['dtype']} | {val} | {r['goal']} | {met} | {r.get('how', '')} |")
    return "\n".join(lines)


def cpu_name(mach: dict) -> str:
    """The CPU's name, with `` (family 25, model 1)`` where the run recorded them (under a hypervisor
    the bare name can hide the generation)."""
    family = f" (family {mach['cpu_family']}, model {mach['cpu_model']})" if mach.get("cpu_family") else ""
    return f"{mach['cpu']}{family}"


def render(result: dict) -> str:
    """Everything a person reads on stdout after a run."""
    bw = result["bandwidth"]
    mach = result["machine"]
    parts = [
        f"machine: {cpu_name(mach)}, {mach['cores']} cores, {mach['threads']} torch thread(s), "
        f"load {', '.join(f'{x:.2f}' for x in mach['load_average'])}; torch {mach['torch']}, "
        f"transformers {mach['transformers']}",
        f"bandwidth: copy {bw['copy_gbs']:.1f} GB/s, read {bw['read_gbs']:.1f} GB/s",
    ]
    if mach.get("isa"):
        parts.append(f"ISA: {', '.join(mach['isa'])} (torch dispatch {mach.get('torch_cpu_capability', '?')})")
    for dtype, run in result["runs"].items():
        if run.get("kernel"):
            k = run["kernel"]
            parts.append(f"{dtype} kernel chosen ({k['source']}, endless.kernels): {k['summary']}")
        if run.get("compiled_matrices"):
            parts.append(f"{dtype}: {run['compiled_matrices']} matrices with compiled one-token kernels "
                         f"(endless.gemv), packed and compiled in {run['pack_seconds']:.0f} s")
        if run.get("compiled_step"):
            parts.append(f"{dtype}: sinks decodes through one compiled graph per token (endless.step); "
                         f"'{UNCOMPILED}' is the eager path in the same rounds")
    parts += [
        "", "Decode, per token (median of interleaved steps):", decode_table(result),
        "", "Stream position (sinks):", positions_table(result),
    ]
    for dtype, run in result["runs"].items():
        p = run["ppl"]
        parts.append(f"\nPerplexity throughput {dtype}: chunked {p['chunked']['tokens_per_s']:.1f} tok/s, "
                     f"token-by-token {p['token_by_token']['tokens_per_s']:.1f} tok/s ({p['speedup']:.1f}x), "
                     f"NLL {p['chunked']['nll']:.5f} vs {p['token_by_token']['nll']:.5f}")
    if any("memory" in run for run in result["runs"].values()):
        parts += ["", "Peak RSS, one process per cell:", memory_table(result)]
    parts += ["", "Targets:", targets_table(result.get("targets") or targets(result))]
    return "\n".join(parts)
