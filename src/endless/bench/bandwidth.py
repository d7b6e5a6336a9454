"""This machine's memory bandwidth, measured in the same run as the decode timings.

Decoding one token reads every weight once, so a decode step cannot be faster than
``bytes read / bandwidth``. Two probes on a buffer far larger than the last-level cache, with
the benchmark's own thread count: ``copy`` (read + write, counted both ways, like STREAM's
copy) and ``read`` (a sum: reads only, which is what a decode step mostly does).
"""

from __future__ import annotations

import torch

from endless.bench.timing import time_calls


def bandwidth(*, mb: int = 256, repeats: int = 8) -> dict[str, float]:
    """GB/s of a large tensor copy (read + write bytes) and of a large sum (read bytes)."""
    n = mb * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy = min(time_calls(lambda: dst.copy_(src), repeats, warmup=2))
    read = min(time_calls(lambda: src.sum(), repeats, warmup=2))
    return {
        "buffer_mb": mb,
        "copy_gbs": 2 * nbytes / copy / 1e9,
        "read_gbs": nbytes / read / 1e9,
        "threads": torch.get_num_threads(),
    }
