"""Attention policies (``spec``: the classes and their spec grammar) and the states that run
them (``ring``, ``recompute``; TransformerFAM's in ``endless.fam``).

``make_state(model, policy, ...)`` returns the state a stream holds under ``policy``: each policy
builds its own (``Policy.make_state``).
"""

from __future__ import annotations

from endless.policies.base import Cache, PolicyState
from endless.policies.spec import BSWA, FAM, Dense, Policy, Recompute, Sinks, Window, check_fits, parse_policy


def make_state(model, policy: "Policy | str", *, batch: int = 1, chunk: int = 128) -> PolicyState:
    """Allocate the state of ``policy`` for ``batch`` streams processed ``chunk`` tokens at a time."""
    return parse_policy(policy).make_state(model, batch=batch, chunk=chunk)


__all__ = ["make_state", "Cache", "PolicyState", "BSWA", "FAM", "Dense", "Policy", "Recompute", "Sinks", "Window",
           "check_fits", "parse_policy"]
