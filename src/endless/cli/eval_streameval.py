"""``endless eval streameval``: StreamEval (docs/methods.md section 2): line retrieval in an endless
stream, accuracy against stream length for each policy and cache size."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args, write_json
from endless.errors import EndlessError
from endless.progress import bar
from endless.validate import BIG, CHUNK, SEED, int_range, number_list


def add_to(sub: argparse._SubParsersAction) -> None:
    """Register as ``endless eval streameval``."""
    p = sub.add_parser(
        "streameval", help="StreamEval: line retrieval accuracy against stream length",
        description=(
            "A stream of lines `line <key>: REGISTER_CONTENT is <value>` generated from --seed; every --every "
            "lines a question asks for the value of the line --back lines earlier, and the answer counts when "
            "greedy decoding writes the value exactly (the right value then stays in the stream). Run under "
            "sinks:4+(C-4) and window:C for each cache size C in --caches, plus dense, or under the --policy "
            "given. Attention sinks keep the model fluent; they do not extend its memory: when the asked line "
            "is further back than the cache, accuracy is zero."
        ),
    )
    add_model_args(p, dtype_default="auto", weights=True)
    p.add_argument("--policy", action="append", default=None, metavar="SPEC", help="policy to evaluate; repeat for several")
    p.add_argument("--caches", type=number_list(int, low=9, what="cache sizes"), default=(256, 1024), metavar="C,C",
                   help="cache sizes for the default sinks/window policies (default: 256,1024)")
    p.add_argument("--no-dense", action="store_true", help="leave dense out of the default policies")
    p.add_argument("--lines", type=int_range("--lines", 1, BIG), default=400, help="lines in the stream (default: %(default)s)")
    p.add_argument("--every", type=int_range("--every", 1, BIG), default=10, help="a question every N lines (default: %(default)s)")
    p.add_argument("--back", type=int_range("--back", 1, BIG), default=20, help="questions ask for the line N lines back (default: %(default)s)")
    p.add_argument("--digits", type=int_range("--digits", 1, 64), default=5, help="digits of each value (default: %(default)s)")
    p.add_argument("--seed", type=SEED.arg, default=0, help="seed of the stream (default: %(default)s)")
    p.add_argument("--bucket", type=int_range("--bucket", 1, BIG), default=1024, help="accuracy per stretch of N tokens (default: %(default)s)")
    p.add_argument("--chunk", type=CHUNK.arg, default=256, help="tokens per forward pass (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="accuracy against stream length")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.eval.streameval import accuracy_by_length, make_stream, plot, run_streameval, stream_text
    from endless.policies.spec import parse_policy

    if args.lines < args.back + args.every:
        raise EndlessError(f"--lines ({args.lines}) must be at least --back + --every ({args.back + args.every}) "
                           "for one question to be asked")
    specs = args.policy or [s for c in args.caches for s in (f"sinks:4+{c - 4}", f"window:{c}")] \
        + ([] if args.no_dense else ["dense"])
    policies = [parse_policy(s) for s in specs]
    try:
        segments = make_stream(args.seed, args.lines, every=args.every, back=args.back, digits=args.digits)
    except ValueError as e:
        raise EndlessError(str(e)) from None
    hf, tok = load_from_args(args)
    model = inference_model(hf, weights=args.weights, kernel=args.kernel)
    results, curves, summary = [], {}, []
    distance = None
    for pol in policies:
        with bar(total=len(segments), desc=pol.spec, unit="seg") as pbar:
            outcomes = run_streameval(model, tok, segments, pol, chunk=args.chunk, progress=pbar.update)
        rows = accuracy_by_length(outcomes, args.bucket)
        curves[pol.spec] = rows
        results += [{"policy": pol.spec, "length": end, "accuracy": acc, "n": n} for end, acc, n in rows]
        acc = sum(o.correct for o in outcomes) / len(outcomes)
        distance = sum(o.distance for o in outcomes) / len(outcomes)
        summary.append({"policy": pol.spec, "accuracy": acc, "queries": len(outcomes),
                        "tokens": outcomes[-1].position, "mean_distance": distance})
    print(f"StreamEval: {args.lines} lines, a question every {args.every} lines for the line {args.back} back "
          f"(~{distance:.0f} tokens back), {summary[0]['tokens']} tokens")
    ends = [end for end, _, _ in next(iter(curves.values()))]
    print(f"{'policy':22s} {'all':>6s} " + " ".join(f"{'<=' + str(e):>7s}" for e in ends))
    for s in summary:
        row = {end: acc for end, acc, _ in curves[s["policy"]]}
        print(f"{s['policy']:22s} {s['accuracy']:6.2f} " + " ".join(f"{row.get(e, float('nan')):7.2f}" for e in ends))
    if args.json:
        write_json(args.json, {
            "results": results, "summary": summary, "model": args.fam or args.model, "identity": model.identity,
            "dtype": args.dtype, "lines": args.lines, "every": args.every, "back": args.back, "digits": args.digits,
            "seed": args.seed, "bucket": args.bucket, "example": stream_text(segments[:3]),
        })
    if args.plot:
        plot(curves, args.plot, title=f"StreamEval ({args.fam or args.model}), line {args.back} back", distance=distance)
    return 0
