"""Streaming-perplexity throughput: exact chunked evaluation against token-by-token.

The same text goes through two streams of the same policy: one fed ``chunk`` tokens per call
(one forward per chunk, every token's log-probability from it), one fed a single token per call
(what a naive evaluation loop does). Chunked processing is exact (``endless.stream``), so both
give the same negative log-likelihood; the benchmark checks that (max abs difference of the
per-token log-probabilities) and reports the speed-up. The two are timed segment by segment in
alternation, so both see the same machine load.
"""

from __future__ import annotations

import math
import time

import torch

from endless.stream import Stream
from endless.transformer import Transformer


def ppl_throughput(model: Transformer, ids: torch.Tensor, *, policy: str, chunk: int = 128, progress=None) -> dict:
    """Tokens/s and NLL of chunked vs token-by-token evaluation of ``ids`` (1-D) under ``policy``."""
    chunked, single = Stream(model, policy, chunk=chunk), Stream(model, policy, chunk=chunk)
    lp_c, lp_s = [], []
    t_c = t_s = 0.0
    for lo in range(0, len(ids), chunk):
        part = ids[lo : lo + chunk]
        t = time.perf_counter()
        lp_c.append(chunked.feed(part))
        t_c += time.perf_counter() - t
        t = time.perf_counter()
        lp_s.extend(single.feed(part[i : i + 1]) for i in range(len(part)))
        t_s += time.perf_counter() - t
        if progress is not None:
            progress.update(len(part))
    a = torch.cat(lp_c, dim=1)[0, 1:].double()
    b = torch.cat(lp_s, dim=1)[0, 1:].double()
    n = len(ids)
    nll_c, nll_s = -a.mean().item(), -b.mean().item()
    return {
        "policy": policy,
        "tokens": n,
        "chunk": chunk,
        "chunked": {"seconds": t_c, "tokens_per_s": n / t_c, "nll": nll_c, "ppl": math.exp(nll_c)},
        "token_by_token": {"seconds": t_s, "tokens_per_s": n / t_s, "nll": nll_s, "ppl": math.exp(nll_s)},
        "speedup": t_s / t_c,
        "nll_abs_diff": abs(nll_c - nll_s),
        "max_abs_logprob_diff": (a - b).abs().max().item(),
    }
