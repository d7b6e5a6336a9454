"""Which state runs which policy: the one table from a policy class to its state class.

``RingKV`` (one ring of key/value slots, ``endless.policies.ring``) serves dense, window, sinks
and BSWA; re-computation keeps token ids (``endless.policies.recompute``); TransformerFAM keeps a
window plus its memory (``endless.fam.state``). A new policy adds one row here. The table lives
apart from the policy classes so that configuration never imports the runtime.
"""

from __future__ import annotations

from endless.errors import EndlessError
from endless.fam.state import FamState
from endless.policies.base import PolicyState
from endless.policies.recompute import RecomputeState
from endless.policies.ring import RingKV
from endless.policies.spec import BSWA, FAM, Dense, Policy, PrefixSinks, Recompute, Sinks, Window, parse_policy

STATES: dict[type, type] = {
    Dense: RingKV,
    Window: RingKV,
    Sinks: RingKV,
    BSWA: RingKV,
    Recompute: RecomputeState,
    FAM: FamState,
}


def make_state(model, policy: "Policy | str", *, batch: int = 1, chunk: int = 128) -> PolicyState:
    """Allocate the state of ``policy`` for ``batch`` streams processed ``chunk`` tokens at a time."""
    policy = parse_policy(policy)
    if isinstance(policy, PrefixSinks):
        raise EndlessError(f"{policy.spec} decides its sinks per conversation (endless serve); "
                           "give a stream sinks:S+W")
    return STATES[type(policy)](model, policy, batch=batch, chunk=chunk)


__all__ = ["STATES", "make_state"]
