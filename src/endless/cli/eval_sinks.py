"""``endless eval sinks``: the StreamingLLM paper's Tables 1 and 2 in one command (docs/methods.md
section 2): how many initial tokens must stay in the cache, and whether their content matters."""

from __future__ import annotations

import argparse

from endless.cli.common import add_model_args
from endless.cli.eval_ppl import add_text_args, run_policies
from endless.validate import BIG, int_range

SINK_COUNTS = (0, 1, 2, 4, 8)


def ablation_specs(cache: int, newline_id: int | None, *, recompute: bool = True) -> list[str]:
    """``S+(cache-S)`` for S in 0, 1, 2, 4, 8; four newline sinks; re-computation of the cache."""
    specs = [f"sinks:{s}+{cache - s}" for s in SINK_COUNTS if s < cache]
    if newline_id is not None:
        specs.append(f"sinks:4+{cache - 4},sink=#{newline_id}")
    if recompute:
        specs.append(f"recompute:{cache}")
    return specs


def add_to(sub: argparse._SubParsersAction) -> None:
    """Register as ``endless eval sinks``."""
    p = sub.add_parser(
        "sinks", help="the attention-sink ablation (the paper's Tables 1 and 2)",
        description=(
            "Streaming perplexity of one text with a cache of --cache tokens split as S sinks + (cache-S) "
            "recent tokens for S = 0 (window attention), 1, 2, 4, 8; with four newline tokens as the sinks "
            "instead of the text's first tokens; and the sliding window with re-computation as the reference "
            "(slow by design: every token recomputes the whole cache, so by default it scores one token in 4 and "
            "the others are compared with it on those tokens; --no-recompute skips it). Prints each perplexity and "
            "its ratio to the reference."
        ),
    )
    add_model_args(p, dtype_default="auto", weights=True)
    p.add_argument("--cache", type=int_range("--cache", 9, BIG), default=256, help="total cache size S+W (default: %(default)s)")
    p.add_argument("--no-recompute", action="store_true", help="skip the re-computation baseline")
    add_text_args(p, tokens=2048, recompute_every=4)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    def specs(tok) -> list[str]:
        nl = tok("\n", add_special_tokens=False).input_ids
        return ablation_specs(args.cache, nl[0] if len(nl) == 1 else None, recompute=not args.no_recompute)

    reference = f"recompute:{args.cache}" if not args.no_recompute else f"sinks:4+{args.cache - 4}"
    run_policies(args, specs, title=f"Attention sinks, cache {args.cache} ({args.fam or args.model})",
                 reference=reference)
    return 0
