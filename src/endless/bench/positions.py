"""Constant time and memory per token, however far into the stream (docs/methods.md section 2).

One ``sinks:S+W`` stream is fed, by exact chunked prefill, up to each checkpoint position
(1k ... 64k and beyond); at every checkpoint it decodes ``rounds`` tokens, timed in steps
interleaved with a *control* stream of the same policy that stays near position S+W. The ratio
``latency at checkpoint / latency of the control`` is then measured under the same load, which
is what the "64k / 1k <= 1.05" target asks; the stream's own latency at its first checkpoint is
reported too. Memory: the process's resident set and its peak at every checkpoint (nothing in
a sinks stream grows, so the peak reached at 1k must still be the peak at 64k).
"""

from __future__ import annotations

import logging
import time

import torch

from endless.bench.decode import OursDecoder, TokenFeed
from endless.bench.timing import interleave, memory, stats
from endless.transformer import Transformer

log = logging.getLogger(__name__)


def position_sweep(model: Transformer, ids: torch.Tensor, positions: list[int], *, rounds: int,
                   sinks: int = 4, window: int = 1020, chunk: int = 128, progress=None, sync=None) -> dict:
    """Decode latency and memory of one sinks stream at each of ``positions`` (ascending)."""
    policy = f"sinks:{sinks}+{window}"
    start = sinks + window
    control = OursDecoder(model, policy, ids, start, chunk=chunk)
    stream = _Fed(model, policy, ids, chunk)
    out = {"policy": policy, "control_position": start, "checkpoints": []}
    for pos in positions:
        t = time.perf_counter()
        fed = stream.advance_to(pos, progress)
        prefill_s = time.perf_counter() - t
        times = interleave({"stream": stream.step, "control": control.step}, rounds, sync=sync)
        at, ref = stats(times["stream"]), stats(times["control"])
        row = {
            "position": pos,
            "decode": at,
            "control": ref,
            "ratio_to_control": at["median_ms"] / ref["median_ms"],
            "prefill_tokens": fed,
            "prefill_tokens_per_s": fed / prefill_s if fed else None,
            **memory(),
        }
        out["checkpoints"].append(row)
        log.info("position %d: %.1f ms/token (control %.1f), peak RSS %.1f MB",
                 pos, at["median_ms"], ref["median_ms"], row["peak_rss_mb"])
    first, last = out["checkpoints"][0], out["checkpoints"][-1]
    out["last_over_first"] = last["decode"]["median_ms"] / first["decode"]["median_ms"]
    out["peak_rss_change"] = last["peak_rss_mb"] / first["peak_rss_mb"] - 1
    return out


class _Fed:
    """A stream advanced by chunked prefill to absolute positions, then decoded token by token."""

    def __init__(self, model: Transformer, policy: str, ids: torch.Tensor, chunk: int) -> None:
        from endless.stream import Stream

        self.stream = Stream(model, policy, chunk=chunk)
        self.ids, self.chunk, self.pos = ids, chunk, 0
        self.feed = TokenFeed(ids, 0)

    def advance_to(self, pos: int, progress=None) -> int:
        """Feed text until the stream has read ``pos`` tokens; returns how many were fed."""
        need = pos - self.stream.position
        fed = 0
        while fed < need:
            n = min(need - fed, 16 * self.chunk)
            lo = self.feed.i % len(self.ids)
            part = self.ids[lo : lo + n]
            self.feed.i += len(part)
            self.stream.feed(part, logprobs=False)
            fed += len(part)
            if progress is not None:
                progress.update(len(part))
        return fed

    def step(self) -> None:
        self.stream.feed(self.feed.next(), logprobs=False)
