"""Key/value state for each attention policy.

``make_state(model, policy, ...)`` returns the engine that holds a stream's state for a policy:
``RingKV`` for every policy that keeps keys (dense, window, sinks, bswa) and ``RecomputeState``
for the re-computation baseline, which keeps token ids only, and ``endless.fam.FamState`` for
TransformerFAM.
"""

from __future__ import annotations

from endless.config import FAM, Policy, Recompute, parse_policy
from endless.policies.recompute import RecomputeState
from endless.policies.ring import RingKV


def make_state(model, policy: "Policy | str", *, batch: int = 1, chunk: int = 128):
    """Allocate the state of ``policy`` for ``batch`` streams processed ``chunk`` tokens at a time."""
    policy = parse_policy(policy)
    if isinstance(policy, Recompute):
        return RecomputeState(model, policy, batch=batch, chunk=chunk)
    if isinstance(policy, FAM):
        from endless.fam.state import FamState  # FAM builds on the ring policies, not the reverse

        return FamState(model, policy, batch=batch, chunk=chunk)
    return RingKV(model, policy, batch=batch, chunk=chunk)


__all__ = ["make_state", "RingKV", "RecomputeState"]
