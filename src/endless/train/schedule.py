"""The learning-rate schedule shared by every trainer: linear warm-up, then constant or a cosine decay.

One function, so that ``train fam``, ``train fam-tiny`` and the sink pre-training experiment mean the
same thing by ``--warmup`` and a cosine decay. A run bounded by the clock (``minutes``) decays by
whichever budget, steps or minutes, is nearer its end, so a run stopped by the clock still ends at
its lowest rate instead of being cut off at its peak.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, steps: int, warmup: int = 0, cosine: bool = True, floor: float = 0.0,
              minutes: float | None = None, elapsed: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    ``(step + 1) / warmup`` during the first ``warmup`` steps; then 1 (``cosine`` false) or a cosine
    from 1 down to ``floor`` at the end of the budget: ``steps``, or ``minutes`` when ``elapsed``
    (seconds of training so far) is further along. Past the end it stays at ``floor``.
    """
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    done = (step - warmup) / max(1, steps - warmup)
    if minutes is not None:
        done = max(done, elapsed / (60 * minutes))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
