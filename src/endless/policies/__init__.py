"""Attention policies: ``spec`` (the classes and their spec grammar), ``base`` (what a state
offers the model and the stream), ``ring`` and ``recompute`` (the states), ``states`` (which
state runs which policy; TransformerFAM's state is in ``endless.fam``).

This package module imports only the configuration, so any module may import a policy class
without pulling in the runtime.
"""

from __future__ import annotations

from endless.policies.spec import BSWA, FAM, Dense, Policy, Recompute, Sinks, Window, check_fits, parse_policy

__all__ = ["BSWA", "FAM", "Dense", "Policy", "Recompute", "Sinks", "Window", "check_fits", "parse_policy"]
