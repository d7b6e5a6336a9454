"""``endless eval fam-cost``: FAM's streaming time and memory per token against BSWA's (same B, M)."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args, write_json
from endless.errors import EndlessError
from endless.validate import BIG, int_range


def add_to(sub: argparse._SubParsersAction) -> None:
    """Register as ``endless eval fam-cost``."""
    p = sub.add_parser(
        "fam-cost", help="FAM vs BSWA streaming time and state memory per token",
        description=(
            "Stream the same random tokens under a fam:BxM+F policy and under bswa:BxM on one model, timed in "
            "interleaved rounds of one block each (so a busy machine slows both alike and the ratio holds), "
            "token by token (decode) and block by block (prefill). Reports ms/token, the FAM/BSWA ratio and the "
            "bytes of each stream's state before and after the timed tokens (constant)."
        ),
    )
    add_model_args(p, weights=True)
    p.add_argument("--policy", default="fam:64x1+16", help="the FAM policy (default: %(default)s)")
    p.add_argument("--warmup", type=int_range("--warmup", 0, BIG), default=1024, help="tokens streamed before timing (default: %(default)s)")
    p.add_argument("--rounds", type=int_range("--rounds", 1, BIG), default=8, help="timed blocks per policy and mode (default: %(default)s)")
    p.add_argument("--no-pack", action="store_true", help="run without the packed inference weights")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.eval.fam_cost import measure, ratios
    from endless.policies.spec import FAM, parse_policy

    pol = parse_policy(args.policy)
    if not isinstance(pol, FAM):
        raise EndlessError(f"--policy must be fam:BxM+F, got {pol.spec}")
    if args.threads is None:
        args.threads = 1  # timings are compared, not maximised
    hf, _ = load_from_args(args, need_tokenizer=False)
    model = inference_model(hf, pack=not args.no_pack, weights=args.weights, kernel=args.kernel)
    results = measure(model, pol.spec, warmup=args.warmup, rounds=args.rounds)
    r = ratios(results)
    print(f"{'policy':22s} {'mode':8s} {'ms/token':>9s} {'state bytes':>14s}")
    for x in results:
        same = "constant" if x.state_bytes_start == x.state_bytes_end else "GREW"
        print(f"{x.policy:22s} {x.mode:8s} {x.ms_per_token:9.2f} {x.state_bytes_end:14,d} ({same})")
    for mode, v in sorted(r.items()):
        print(f"FAM/BSWA time per token, {mode}: {v:.3f}x")
    if args.json:
        write_json(args.json, {
            "results": [x.as_dict() for x in results],
            "ratio": r,
            "threads": args.threads,
            "model": args.fam or args.model,
        })
    return 0
