"""``endless soak``: a million tokens of real text through one stream, measured span by span."""

from __future__ import annotations

import argparse
import shlex
import sys

from endless.cli.common import add_model_args, load_from_args, write_json
from endless.validate import SEED, int_range


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soak",
        help="stream a million tokens and report latency, RSS and perplexity per span",
        description=(
            "Feed --tokens tokens of the embedded texts (King James Bible and Shakespeare, shuffled by "
            "section, repeated if needed) through one stream and report, per --span tokens, perplexity, "
            "whether every NLL stayed finite, per-token latency, RSS and the state's size, plus one-token "
            "decode latency (timed in rounds interleaved with a control stream held at the window's end, "
            "so a busy machine moves both alike) and RSS at 1k, 2k, 4k ... tokens. Prints the issue's "
            "targets: paired latency at the end / at 1k <= "
            "1.05, RSS change <= 1%%, no non-finite NLL, last span's perplexity within 10%% of the first's."
        ),
    )
    add_model_args(p, dtype_default="auto", weights=True)
    p.add_argument("--tokens", type=int_range("--tokens", 1024, 1 << 30), default=1 << 20,
                   help="tokens to stream (default: %(default)s)")
    p.add_argument("--policy", default="sinks:4+1020", help="attention policy (default: %(default)s)")
    p.add_argument("--span", type=int_range("--span", 256, 1 << 30), default=1 << 16,
                   help="tokens per reported span (default: %(default)s)")
    p.add_argument("--chunk", type=int_range("--chunk", 1, 4096), default=128,
                   help="tokens per forward pass (default: %(default)s)")
    p.add_argument("--seed", type=SEED.arg, default=0, help="section shuffle seed")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw latency, RSS and perplexity against position")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.bench.soak import SoakConfig, plot, render, soak, soak_ids, targets
    from endless.cli.common import inference_model
    from endless.policies.spec import parse_policy

    policy = parse_policy(args.policy)  # a bad spec fails before the model loads
    cfg = SoakConfig(tokens=args.tokens, policy=policy.spec, span=args.span, chunk=args.chunk, seed=args.seed)
    hf, tok = load_from_args(args, need_tokenizer=False)
    model = inference_model(hf, weights=args.weights, kernel=args.kernel)
    ids = soak_ids(tok, model.dims.vocab, cfg.tokens, seed=cfg.seed)

    def progress(row: dict) -> None:
        print(f"span {row['span']}: tokens {row['start']}-{row['end']} ppl {row['ppl']:.3f} "
              f"{row['ms_per_token'] or 0:.3f} ms/token RSS {row['rss_mb']:.1f} MB "
              f"non-finite {row['nonfinite']}", file=sys.stderr, flush=True)

    result = soak(model, ids, cfg, progress=progress)
    result["command"] = "endless soak " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else None
    result["targets"] = targets(result)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    print(render(result))
    return 0
