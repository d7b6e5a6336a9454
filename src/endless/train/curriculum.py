"""Lengths grown in stages: the curriculum of recurrent-memory training.

After "Scaling Transformer to 1M tokens and beyond with RMT" (Bulatov et al., 2023), section 4:
training starts on few segments and their number grows each time training converges, so the
memory is asked to survive more updates only once it survives the current number. The unit here
is a token length: the longest training sequence (`train fam`) or the carried hold (`train
fam-tiny`). A stage ends when the mean of its last ``window`` recorded losses is below
``threshold`` (0: never by loss) or when the caller says its budget share is spent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


class Stages:
    """The current length of a staged curriculum (``lengths`` ascending; none: length 0)."""

    def __init__(self, lengths: Sequence[int], *, threshold: float = 0.0, window: int = 50) -> None:
        self.lengths = tuple(lengths)
        self.threshold, self.window = threshold, window
        self.stage = 0
        self.recent: list[float] = []
        self.began: list[dict] = []  # {"step", "length"} where each stage began

    @property
    def length(self) -> int:
        return self.lengths[self.stage] if self.lengths else 0

    @property
    def share(self) -> float:
        """The part of the whole budget that ends this stage (stage k of n: (k+1)/n)."""
        return (self.stage + 1) / max(1, len(self.lengths))

    def record(self, step: int, loss: float, *, spent: bool = False) -> None:
        """Note the loss of ``step`` (0-based); move to the next stage when this one is learnt or
        ``spent`` (its budget share is used up). The last stage stays."""
        if not self.began:
            self.began.append({"step": step, "length": self.length})
        self.recent.append(loss)
        last = self.recent[-self.window:]
        learned = self.threshold > 0 and len(last) == self.window and sum(last) / self.window < self.threshold
        if (learned or spent) and self.stage + 1 < len(self.lengths):
            self.stage += 1
            self.recent = []
            self.began.append({"step": step + 1, "length": self.length})
            log.info("curriculum: length %d from step %d", self.length, step + 1)


__all__ = ["Stages"]
