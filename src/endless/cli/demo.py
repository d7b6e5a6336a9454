"""``endless demo``: the headline demonstration on the embedded model (docs/methods.md section 2,
Figure 3): a long text streamed under dense attention, window attention and attention sinks."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args, write_json
from endless.progress import bar
from endless.validate import BIG, int_range

POLICIES = ("dense", "window:256", "sinks:4+252")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the headline demo: a long text under dense, window and attention-sink policies",
        description=(
            "Stream the first --tokens tokens of the King James Bible through the embedded SmolLM2 three times "
            "and score every token: dense attention (keeps everything: fine until the model's trained context of "
            "8192 tokens, then it degrades), window attention with a 256-token cache (collapses as soon as the "
            "first tokens are evicted), and StreamingLLM's attention sinks, 4 sinks + 252 recent tokens (the same "
            "256-token cache, close to dense all along, constant memory and time per token). Prints the table and "
            "writes the plot of log-perplexity against position (--plot). What leaves the cache is forgotten: "
            "sinks keep the model fluent, they do not extend its memory (TransformerFAM does)."
        ),
    )
    add_model_args(p, dtype_default="auto", weights=True)
    p.add_argument("--tokens", type=int_range("--tokens", 300, BIG), default=12288, help="tokens of the text to stream (default: %(default)s)")
    p.add_argument("--plot", type=Path, default=Path("endless-demo.png"), metavar="PNG",
                   help="where to draw the plot (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.data.texts import text_ids
    from endless.eval.ppl import evaluate, plot, table

    hf, tok = load_from_args(args)
    model = inference_model(hf, weights=args.weights, kernel=args.kernel)
    ids = text_ids(tok, "kjv", args.tokens, longer_than=257)
    context = model.dims.context
    print(f"Streaming {ids.numel()} tokens of the King James Bible through {args.model} ({args.dtype}, trained "
          f"context {context}) under {', '.join(POLICIES)}.", flush=True)
    results = []
    for spec in POLICIES:
        with bar(total=ids.numel(), desc=spec, unit="tok") as pbar:
            results.append(evaluate(model, ids, spec, chunk=256, progress=pbar.update))
    print(table(results, reference="dense"))
    by = {r.policy: r for r in results}
    win, sinks, dense = by["window:256"], by["sinks:4+252"], by["dense"]
    print(f"\nSame 256-token cache: window attention {win.ppl:.2f}, attention sinks {sinks.ppl:.2f} "
          f"({win.ppl / sinks.ppl:.2f}x lower perplexity with 4 sinks).")
    if ids.numel() > context + 256:
        from endless.eval.ppl import perplexity

        inside, past = slice(None, context - 1), slice(context - 1, None)  # nll[i] scores token i+1
        print(f"Tokens 1-{context - 1} (inside the trained context): dense {perplexity(dense.nll[inside]):.2f}, "
              f"sinks {perplexity(sinks.nll[inside]):.2f} with a 256-token cache instead of up to {context}.")
        print(f"Tokens {context}-{ids.numel() - 1} (past it): dense {perplexity(dense.nll[past]):.2f}, "
              f"sinks {perplexity(sinks.nll[past]):.2f}.")
    plot(results, args.plot, title=f"Streaming perplexity, {args.model}",
         marks=[(context, f"trained context ({context})")] if ids.numel() > context else [])
    print(f"Plot: {args.plot}")
    if args.json:
        write_json(args.json, {"results": [r.as_dict() for r in results], "model": args.model,
                               "dtype": args.dtype, "text": "kjv"})
    return 0
