"""Every user-facing value checked in one place, with one wording for the CLI and the Python API.

Contract (issue 24): a value out of range, of the wrong kind or contradicting another is refused
with one line that names the option and the accepted range. The same ``Rule`` serves both
surfaces: ``rule.arg`` is an argparse ``type=`` (``endless.cli.main`` then prints ``endless: error:
argument --chunk: must be an integer in [1, 65536], got '0'`` and returns 2) and ``rule.check(value)``
is what ``Stream``, ``Stream.generate`` and the trainers' configs call (raising
``EndlessError("chunk (--chunk) must be an integer in [1, 65536], got 0")``). A component with many
numbers keeps them in a ``rules(...)`` table that its CLI flags and its ``check_fields`` share.
Comma-separated lists of numbers (``--lengths 1024,4096``) go through ``number_list``.

NaN and infinities are refused by every float rule: no option of this package means anything
at NaN, and ``nan < 0`` is False, so a bare comparison would let it through.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from endless.errors import EndlessError


def _fmt(x: float) -> str:
    """Bounds as people write them: 65536, 2^30, 2^63-1, 0.5, 1000000."""
    if x == 2**63 - 1:
        return "2^63-1"
    if isinstance(x, int) and x >= 1 << 20 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"  # 2^30, not 1073741824
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))  # 1000000, not 1e+06
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Rule:
    """A number option: ``kind`` int or float within [low, high] (``open_low``: strictly above low)."""

    name: str  # the Python parameter; the flag is --name with '-' for '_'
    kind: type = int
    low: float | None = None
    high: float | None = None
    open_low: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def accepted(self) -> str:
        """'an integer in [1, 65536]', 'a number in (0, 1]', 'an integer >= 0'."""
        what = "an integer" if self.kind is int else "a number"
        lo = "(" if self.open_low else "["
        if self.low is not None and self.high is not None:
            return f"{what} in {lo}{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{what} <= {_fmt(self.high)}"
        return what

    def problem(self, value) -> str | None:
        """Why ``value`` is refused (None if it is accepted)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.accepted()}, got {value!r}"
        if self.kind is int and not (isinstance(value, int) or (math.isfinite(value) and value == int(value))):
            return f"must be {self.accepted()}, got {value!r}"
        if not math.isfinite(value):
            return f"must be {self.accepted()}, got {value!r}"
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and value > self.high
        if below or above:
            return f"must be {self.accepted()}, got {value!r}"
        return None

    def check(self, value):
        """``value`` (as ``kind``) if accepted, else ``EndlessError`` naming the parameter and its flag."""
        why = self.problem(value)
        if why is not None:
            raise EndlessError(f"{self.name} ({self.flag}) {why}")
        return self.kind(value)

    def check_optional(self, value):
        """``check`` that lets None (the option's "not given") through."""
        return None if value is None else self.check(value)

    def parse(self, text: str):
        """argparse ``type=``: the text as ``kind``; a refusal is argparse's one-line usage error."""
        try:
            value = int(text.strip(), 10) if self.kind is int else float(text)
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"must be {self.accepted()}, got {text!r}") from None
        why = self.problem(value)
        if why is not None:
            raise argparse.ArgumentTypeError(f"must be {self.accepted()}, got {text!r}")
        return value

    @property
    def arg(self):
        """The argparse ``type=`` callable."""
        return self.parse


def int_range(flag: str, low: int | None = None, high: int | None = None):
    """Shorthand for CLI-only integer options: ``type=int_range("--chunk", 1, 65536)``."""
    return Rule(flag.lstrip("-").replace("-", "_"), int, low, high).arg


def float_range(flag: str, low: float | None = None, high: float | None = None, *, open_low: bool = False):
    """Shorthand for CLI-only number options: ``type=float_range("--lr", 0, 1, open_low=True)``."""
    return Rule(flag.lstrip("-").replace("-", "_"), float, low, high, open_low).arg


def number_list(kind: type = int, *, low: float | None = 1, high: float | None = None, what: str = "values"):
    """An argparse ``type`` for comma-separated numbers ("1024,4096"), each ``kind`` within [low, high].

    Empty items are skipped ("1024,,4096" is two values) but at least one must remain. A refusal is
    argparse's one-line usage error naming the flag: ``argument --lengths: lengths must be
    comma-separated integers >= 1, got '0,abc'``. NaN and infinities are refused, as by ``Rule``.
    """
    rule = Rule(what, kind, low, high)
    plural = "integers" if kind is int else "numbers"
    accepted = rule.accepted().replace("an integer", plural).replace("a number", plural)

    def parse(text: str) -> tuple:
        items = [v.strip() for v in str(text).split(",") if v.strip()]
        try:
            values = tuple(int(v, 10) if kind is int else float(v) for v in items)
        except ValueError:
            values = ()
        if not values or any(rule.problem(v) is not None for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated {accepted}, got {text!r}")
        return values

    return parse


BIG = 1 << 30  # "any count a user could mean": a bound that still catches a typo'd 10^12
SEED_MAX = 2**63 - 1

# The rules shared by several commands and by the Python API (one wording everywhere).
CHUNK = Rule("chunk", int, 1, 1 << 16)
BATCH = Rule("batch", int, 1, 4096)
THREADS = Rule("threads", int, 1, 4096)
TEMPERATURE = Rule("temperature", float, 0.0, 100.0)
MAX_NEW_TOKENS = Rule("max_new_tokens", int, 1, BIG)
SEED = Rule("seed", int, 0, SEED_MAX)
TOKENS = Rule("tokens", int, 2, BIG)
PROBABILITY = Rule("p", float, 0.0, 1.0)
LR = Rule("lr", float, 0.0, None, open_low=True)  # no ceiling: a diverging run stops at its first non-finite loss
MINUTES = Rule("minutes", float, 0.0, 1e6, open_low=True)  # ~2 years


def rules(*items: Rule) -> dict[str, Rule]:
    """``{rule.name: rule}``: a component's rules, looked up by the CLI (``.arg``) and checked by
    the component itself (``check_fields``), so both surfaces word a refusal alike."""
    return {r.name: r for r in items}


def check_fields(obj, table: dict[str, Rule], optional: tuple[str, ...] = ()) -> None:
    """Check ``obj``'s attribute of every rule in ``table`` (those in ``optional`` may be None)."""
    for name, rule in table.items():
        value = getattr(obj, name)
        if name in optional:
            rule.check_optional(value)
        else:
            rule.check(value)


def probability(name: str) -> Rule:
    """A probability or fraction option named ``name``: a number in [0, 1]."""
    return Rule(name, float, 0.0, 1.0)


def choice(name: str, value, choices) -> object:
    """``value`` if it is one of ``choices``, else one line listing them."""
    if value not in choices:
        listed = ", ".join(str(c) for c in choices)
        raise EndlessError(f"{name} (--{name.replace('_', '-')}) must be one of {listed}; got {value!r}")
    return value


def ordered(low_flag: str, low, high_flag: str, high) -> None:
    """Two options that must not contradict: ``low`` <= ``high``."""
    if low is not None and high is not None and low > high:
        raise EndlessError(f"{low_flag} ({low}) must not exceed {high_flag} ({high})")


def existing_file(flag: str, path: "str | Path") -> Path:
    """``path`` as a Path if it names a file, else one line."""
    p = Path(path)
    if not p.is_file():
        raise EndlessError(f"{flag}: no such file: {p}")
    return p


def writable_target(flag: str, path: "str | Path") -> Path:
    """``path`` as a Path if a file may be written there: not a folder, and its nearest existing
    parent is a writable folder (the missing ones are created on write)."""
    p = Path(path)
    if p.is_dir():
        raise EndlessError(f"{flag}: {p} is a folder, expected a file path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    import os

    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise EndlessError(f"{flag}: cannot write under {parent}")
    return p


__all__ = ["Rule", "int_range", "float_range", "number_list", "rules", "check_fields", "probability", "choice", "ordered", "existing_file", "writable_target",
           "CHUNK", "BATCH", "THREADS", "TEMPERATURE", "MAX_NEW_TOKENS", "SEED", "TOKENS", "LR", "MINUTES"]
