"""Progress bars that suit both a terminal and a log file.

On a terminal the bar is live; when stderr is redirected (nohup, CI, ``> log``) tqdm would write
every refresh into the file, so the bar refreshes at most once every 30 s there. It checks the
clock on every step: tqdm's adaptive step count would stay silent for minutes when steps slow.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        disable: bool = False, leave: bool = False):
    """A tqdm bar on stderr: live on a terminal, one line every 30 s in a log file."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave, disable=disable,
                dynamic_ncols=tty, mininterval=0.1 if tty else 30.0, miniters=None if tty else 1)
