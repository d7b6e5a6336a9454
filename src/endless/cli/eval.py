"""``endless eval TASK``: the papers' evaluations, one module per task.

Each task module exposes ``add_to(eval_subparsers)``; adding one is a line in ``TASKS``.
StreamingLLM (docs/methods.md section 2): ``ppl``, ``sinks``, ``streameval``, ``arc``.
TransformerFAM (section 3): ``passkey``, ``fam-cost``.
"""

from __future__ import annotations

import argparse
import importlib

# task name -> module under endless.cli
TASKS = {
    "ppl": "eval_ppl",
    "sinks": "eval_sinks",
    "streameval": "eval_streameval",
    "arc": "eval_arc",
    "passkey": "passkey",
    "fam-cost": "famcost",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="the papers' evaluations: ppl, sinks, streameval, arc, passkey, fam-cost",
        description=(
            "Evaluations of the StreamingLLM and TransformerFAM papers on any supported model: streaming "
            "perplexity under several policies (ppl), the attention-sink ablation (sinks), StreamEval "
            "(streameval), streaming ARC-Easy (arc), PassKey retrieval (passkey) and FAM's cost against "
            "BSWA (fam-cost). Every task prints a table and writes --json PATH."
        ),
    )
    tsub = p.add_subparsers(dest="eval_task", metavar="TASK")
    for module in TASKS.values():
        importlib.import_module(f"endless.cli.{module}").add_to(tsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
