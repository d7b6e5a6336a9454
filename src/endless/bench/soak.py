"""The soak: one stream over a million tokens of real text, measured span by span.

Contract (issue 24): ``soak`` feeds ``tokens`` tokens of the embedded texts (King James Bible and
Shakespeare cut into sections, shuffled by section and interleaved in proportion, repeated if
needed) through one ``Stream`` in chunks, and returns per ``span`` tokens: perplexity, whether every
NLL was finite, the median per-token time of its chunks, RSS, the state's bytes and how far back
its window reaches; and per checkpoint at 1k, 2k, 4k ... ``tokens``: the one-token decode latency
there and the RSS. ``targets`` turns that into the issue's pass/fail lines: latency at the end / at
1k <= 1.05, RSS change <= 1 %, NLL finite throughout, perplexity of the last span within 10 % of the
first span's beyond the window.

Latency is paired, as in ``endless bench``'s position sweep: at each checkpoint the stream decodes
``PROBE_ROUNDS`` tokens interleaved round by round with a *control* stream of the same policy held
near position S+W, and only the ratio stream / control is compared across checkpoints. A soak runs
for many minutes, and what else the machine does in that time (a second job on the other core
took the unpaired 1M / 1k figure from 1.00 to 1.24 in one run) moves both sides of the ratio
alike. The probe runs on a snapshot: the stream is restored afterwards, so the text it reads and
its perplexity are the same as without the probe.

Nothing grows with the stream in this loop: per-chunk times live in a span-local array and NLL
in running float64 sums, so the RSS measured is the model's and the state's.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from array import array
from dataclasses import dataclass

import torch

from endless.bench.decode import OursDecoder, TokenFeed
from endless.bench.timing import interleave, machine, memory, stats
from endless.stream import Stream

SECTION_CHARS = 4000  # about one KJV chapter (the text has no chapter marks) or one scene
LATENCY_TOKENS = 2048  # a checkpoint's chunked throughput: the median over the chunks of the last 2k tokens
PROBE_ROUNDS = 128  # one-token decode steps per checkpoint, each side of the paired probe


@dataclass(frozen=True)
class SoakConfig:
    tokens: int = 1 << 20
    policy: str = "sinks:4+1020"
    span: int = 1 << 16
    chunk: int = 128
    seed: int = 0


def sections(text: str, chars: int = SECTION_CHARS) -> list[str]:
    """``text`` cut at line ends into consecutive pieces of about ``chars`` characters."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= chars:
            out.append("".join(cur))
            cur, size = [], 0
    if cur:
        out.append("".join(cur))
    return [s for s in out if s.strip()]


def _interleave(groups: list[list[list[int]]], rng: random.Random) -> list[list[int]]:
    """Merge shuffled groups so every stretch of the result holds each group in proportion to
    its share of the tokens: a span's perplexity then measures position, not which book it got."""
    for g in groups:
        rng.shuffle(g)
    totals = [sum(len(s) for s in g) or 1 for g in groups]
    used, idx, out = [0] * len(groups), [0] * len(groups), []
    while any(i < len(g) for i, g in zip(idx, groups, strict=True)):
        live = [k for k in range(len(groups)) if idx[k] < len(groups[k])]
        k = min(live, key=lambda j: used[j] / totals[j])  # the group furthest behind its share
        out.append(groups[k][idx[k]])
        used[k] += len(groups[k][idx[k]])
        idx[k] += 1
    return out


def soak_ids(tokenizer, vocab: int, n: int, *, seed: int = 0, corpora=("kjv", "shakespeare")) -> torch.Tensor:
    """(n,) int64 ids: the corpora's sections tokenized one by one, shuffled by section,
    interleaved in proportion and repeated (reshuffled) until ``n``. Without a tokenizer (a
    tiny random model) a section's UTF-8 bytes modulo ``vocab`` stand in for its tokens."""
    from endless.data.texts import read_text

    groups = []
    for name in corpora:
        parts = sections(read_text(name))
        if tokenizer is None:
            groups.append([[b % vocab for b in s.encode("utf-8")] for s in parts])
        else:
            groups.append(tokenizer(parts, add_special_tokens=False).input_ids)
    rng, out, have = random.Random(seed), [], 0
    while have < n:
        for sec in _interleave([list(g) for g in groups], rng):
            out.append(sec)
            have += len(sec)
            if have >= n:
                break
    flat = torch.tensor([t for sec in out for t in sec][:n], dtype=torch.long)
    return flat


def _state_stats(stream: Stream) -> dict:
    """Bytes of the state and, for slot caches, how many slots and how far back (in tokens) the
    oldest window key lies from the newest token: both must stay bounded forever."""
    tensors = stream.state.state_tensors()
    out = {"state_mb": sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20}
    slots = getattr(stream.state, "slots", None)
    if slots is not None:
        pos = slots.pos[getattr(stream.state, "n_sinks", 0):]
        pos = pos[pos >= 0]
        out["slots"] = int(slots.capacity)
        out["window_reach"] = int(stream.state.t - 1 - pos.min()) if pos.numel() else 0
    return out


def _checkpoints(tokens: int) -> list[int]:
    out, p = [], 1024
    while p < tokens:
        out.append(p)
        p *= 2
    return out + [tokens]


def soak(model, ids: torch.Tensor, cfg: SoakConfig, *, progress=None) -> dict:
    """Stream ``ids`` under ``cfg.policy`` and measure it (see the module's contract).
    ``progress(span_row)`` is called after every span (e.g. to print a line)."""
    stream = Stream(model, cfg.policy, chunk=cfg.chunk)
    window = getattr(stream.policy, "sinks", 0) + getattr(stream.policy, "window", 0)  # 0: no window
    control = OursDecoder(stream.model, cfg.policy, ids, max(1, min(window or 1024, len(ids) - 1)), chunk=cfg.chunk)
    snap = stream.snapshot()  # the probe's buffers, allocated before anything is measured
    checkpoints, cp_rows = _checkpoints(len(ids)), []
    spans, times = [], array("d")  # times: per-token seconds of this span's chunks
    recent = array("d")  # the last LATENCY_TOKENS worth of chunk times, for checkpoints
    nll = nll_beyond = 0.0
    n = n_beyond = nonfinite = 0
    span_start, t0 = 0, time.perf_counter()
    for lo in range(0, len(ids), cfg.chunk):
        part = ids[lo : lo + cfg.chunk]
        t = time.perf_counter()
        lp = stream.feed(part)[0].double()
        dt = (time.perf_counter() - t) / len(part)
        if lo > 0:  # the first chunk carries one-off set-up (tables, allocations)
            times.append(dt)
            recent.append(dt)
            if len(recent) > LATENCY_TOKENS // cfg.chunk:
                del recent[0]
        if lo == 0:
            lp = lp[1:]  # the stream's very first token has no prediction (NaN by contract)
        first = lo + len(part) - len(lp)  # stream index of lp[0]
        bad = int((~torch.isfinite(lp)).sum())
        nonfinite += bad
        nll -= float(lp.sum())
        n += len(lp)
        keep = max(0, window - first)  # tokens still inside the first window are not "beyond" it
        if keep < len(lp):
            nll_beyond -= float(lp[keep:].sum())
            n_beyond += len(lp) - keep
        end = lo + len(part)
        while checkpoints and end >= checkpoints[0]:
            mem = memory()  # before the probe: the stream's own footprint
            cp_rows.append({"position": checkpoints.pop(0), **_probe(stream, control, ids, end, snap),
                            "chunk_ms_per_token": 1e3 * statistics.median(recent or [dt]), **mem})
        if end - span_start >= cfg.span or end == len(ids):
            row = {"span": len(spans), "start": span_start, "end": end, "tokens": n,
                   "ppl": math.exp(nll / n) if n and math.isfinite(nll) else float("nan"),
                   "ppl_beyond_window": math.exp(nll_beyond / n_beyond) if n_beyond and math.isfinite(nll_beyond) else None,
                   "nonfinite": nonfinite, "finite": nonfinite == 0,
                   "ms_per_token": 1e3 * statistics.median(times) if times else None,
                   "seconds": time.perf_counter() - t0, **memory(), **_state_stats(stream)}
            spans.append(row)
            if progress is not None:
                progress(row)
            span_start, t0, times = end, time.perf_counter(), array("d")
            nll = nll_beyond = 0.0
            n = n_beyond = nonfinite = 0
    return {"config": cfg.__dict__, "model": model.identity if hasattr(model, "identity") else stream.model.identity,
            "dtype": str(stream.model.dtype).removeprefix("torch."), "window": window,
            "spans": spans, "checkpoints": cp_rows, "machine": machine()}


def _probe(stream: Stream, control: OursDecoder, ids: torch.Tensor, at: int, snap: dict) -> dict:
    """One-token decode at the stream's position, paired with the control (see the module's
    contract); the stream is left exactly as it was. ``snap`` holds the buffers the state is saved
    in, allocated once per soak so the probe adds nothing to the RSS measured after it."""
    stream.snapshot(into=snap)
    feed = TokenFeed(ids, at % len(ids))
    times = interleave({"stream": lambda: stream.feed(feed.next(), logprobs=False), "control": control.step},
                       PROBE_ROUNDS)
    stream.restore(snap)
    mine, ref = stats(times["stream"]), stats(times["control"])
    # the median of per-round ratios: a round's two steps run back to back, so a load change
    # between rounds cancels in their ratio
    ratio = statistics.median(a / b for a, b in zip(times["stream"], times["control"], strict=True))
    return {"ms_per_token": mine["median_ms"], "control_ms_per_token": ref["median_ms"], "ratio_to_control": ratio}


def targets(result: dict) -> list[dict]:
    """The issue's four targets as ``{target, measured, goal, met}`` rows. Latency: the paired
    ratio (stream / control) at the last checkpoint over the same ratio at the first."""
    cps, spans = result["checkpoints"], result["spans"]
    first_cp, last_cp = cps[0], cps[-1]
    lat = last_cp["ratio_to_control"] / first_cp["ratio_to_control"]
    rss = last_cp["rss_mb"] / first_cp["rss_mb"] - 1
    finite = all(s["finite"] for s in spans)
    first_ppl = spans[0]["ppl_beyond_window"] or spans[0]["ppl"]
    drift = spans[-1]["ppl"] / first_ppl - 1 if len(spans) > 1 else 0.0
    return [
        {"target": f"decode latency at {last_cp['position']} / at {first_cp['position']} (each paired with a control)",
         "measured": lat,
         "goal": "<= 1.05", "met": lat <= 1.05},
        {"target": f"RSS change {first_cp['position']} -> {last_cp['position']}", "measured": rss,
         "goal": "abs <= 1%", "met": abs(rss) <= 0.01},
        {"target": "NLL finite at every token", "measured": sum(s["nonfinite"] for s in spans),
         "goal": "0 non-finite", "met": finite},
        {"target": "ppl of the last span / first span beyond the window", "measured": drift,
         "goal": "abs <= 10%", "met": abs(drift) <= 0.10},
    ]


def render(result: dict) -> str:
    """Spans, checkpoints and targets as plain-text tables."""
    lines = ["span  tokens              ppl     ms/token  RSS MB   state MB  reach"]
    for s in result["spans"]:
        ppl = f"{s['ppl']:8.3f}" + (f" ({s['ppl_beyond_window']:.3f} beyond window)" if s["span"] == 0 and s["ppl_beyond_window"] else "")
        ms = f"{s['ms_per_token']:.3f}" if s["ms_per_token"] is not None else "-"
        lines.append(f"{s['span']:>4}  {s['start']:>8}-{s['end']:<8}  {ppl}  {ms:>8}  {s['rss_mb']:7.1f}  "
                     f"{s['state_mb']:8.2f}  {s.get('window_reach', '-')}")
    lines += ["", "position  decode ms  control ms  ratio  chunked ms/token  RSS MB"]
    lines += [f"{c['position']:>8}  {c['ms_per_token']:9.3f}  {c['control_ms_per_token']:10.3f}  "
              f"{c['ratio_to_control']:5.3f}  {c['chunk_ms_per_token']:16.3f}  {c['rss_mb']:7.1f}"
              for c in result["checkpoints"]]
    lines += [""] + [f"{'met' if t['met'] else 'NOT MET':>7}  {t['target']}: {t['measured']:.4g} (goal {t['goal']})"
                     for t in result["targets"]]
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Latency, RSS and perplexity against stream position (log x), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from endless.files import save_png

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    cps, spans = result["checkpoints"], result["spans"]
    a.plot([x["position"] for x in cps], [x["ms_per_token"] for x in cps], marker="o", label="one-token decode")
    a.plot([x["position"] for x in cps], [x["control_ms_per_token"] for x in cps], marker="x", ls=":",
           label="control at S+W (same rounds)")
    a.plot([s["end"] for s in spans if s["ms_per_token"]], [s["ms_per_token"] for s in spans if s["ms_per_token"]],
           marker=".", ls="--", label=f"chunked feed, span medians (per token, chunk {result['config']['chunk']})")
    a.set(xscale="log", xlabel="stream position (tokens)", ylabel="ms per token", title="latency", ylim=(0, None))
    a.legend()
    b.plot([x["position"] for x in cps], [x["rss_mb"] for x in cps], marker="o")
    b.set(xscale="log", xlabel="stream position (tokens)", ylabel="RSS (MB)", title="resident memory", ylim=(0, None))
    c.plot([s["end"] for s in spans], [s["ppl"] for s in spans], marker="o")
    c.set(xlabel="end of span (tokens)", ylabel="perplexity", title=f"perplexity per {result['config']['span']}-token span")
    fig.suptitle(f"soak: {result['config']['policy']}, {result['dtype']}, {result['config']['tokens']} tokens")
    fig.tight_layout()
    save_png(fig, path)


__all__ = ["SoakConfig", "soak", "soak_ids", "sections", "targets", "render", "plot"]
