"""``endless eval ppl``: streaming perplexity of a long text under several policies
(docs/methods.md section 2, Figures 3 and 5)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args, write_json
from endless.errors import EndlessError
from endless.progress import bar
from endless.validate import BIG, CHUNK, int_range

DEFAULT_POLICIES = ("sinks:4+1020", "window:1024", "dense")


def add_text_args(p: argparse.ArgumentParser, *, tokens: int, recompute_every: int = 1) -> None:
    """--text, --tokens, --chunk, --recompute-every, --json, --plot, --smooth: shared by ppl and sinks."""
    p.add_argument("--text", default=None, metavar="FILE",
                   help="UTF-8 text file, or a built-in corpus: kjv (default), shakespeare, kjv-heldout, shakespeare-heldout "
                        "(the last 5 %% of each, never trained on by `train sink-pretrain`)")
    p.add_argument("--tokens", type=int_range("--tokens", 2, BIG), default=tokens, help="tokens of the text to stream (default: %(default)s)")
    p.add_argument("--chunk", type=CHUNK.arg, default=256,
                   help="tokens per forward pass; exact for any size, only speed changes (default: %(default)s)")
    p.add_argument("--recompute-every", type=int_range("--recompute-every", 1, BIG), default=recompute_every, metavar="K",
                   help="score recompute:W on one token in K past the first window (it costs W+1 forwards per "
                        "token); other policies are compared with it on those tokens (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the results as JSON; the per-token NLL goes next to it (PATH.nll.safetensors)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="log-perplexity against position")
    p.add_argument("--smooth", type=int_range("--smooth", 1, BIG), default=256, help="moving-average width of the plot (default: %(default)s)")
    p.add_argument("--prefix-token", type=int_range("--prefix-token", 0, BIG), default=None, metavar="ID",
                   help="put token ID before the text in every stream, where it counts as stream index 0 (so "
                        "sinks:1+W keeps it as the only sink); scored are the text's tokens 1..N-1 as without it. "
                        "For a model pre-trained with a learnable sink token (`train sink-pretrain --variant "
                        "learnable-sink` records its id as endless_sink_token in config.json)")


def add_to(sub: argparse._SubParsersAction) -> None:
    """Register as ``endless eval ppl``."""
    p = sub.add_parser(
        "ppl", help="streaming perplexity under one or several policies",
        description=(
            "Stream a long text through the model under each --policy and report its perplexity: every token "
            "is scored given everything before it as the policy keeps it (dense: all of it; window:W: the last "
            "W; sinks:S+W: the first S and the last W; recompute:W: the last W recomputed from scratch). "
            "Chunked and exact: the same numbers as token-by-token reading, far faster. Dense runs past the "
            "model's trained context on purpose, to show it degrade there."
        ),
    )
    add_model_args(p, dtype_default="auto", weights=True)
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help=f"policy to evaluate; repeat for several (default: {' '.join(DEFAULT_POLICIES)})")
    add_text_args(p, tokens=4096)
    p.set_defaults(func=run)


def run_policies(args: argparse.Namespace, specs, *, title: str, reference: str | None = None):
    """Load the model and text, evaluate every spec, print the table, write JSON/NLL/plot.
    ``specs`` is a list of policy specs, or a function of the tokenizer returning one."""
    from endless.data.texts import text_ids
    from endless.eval.ppl import evaluate, plot, save_nll, table
    from endless.policies.spec import parse_policy

    if not callable(specs):
        [parse_policy(s) for s in specs]  # bad specs fail before the model loads
    hf, tok = load_from_args(args)
    policies = [parse_policy(s) for s in (specs(tok) if callable(specs) else specs)]
    model = inference_model(hf, weights=args.weights, kernel=args.kernel)
    spans = [p.span() for p in policies if p.span() is not None]
    ids = text_ids(tok, args.text, args.tokens, longer_than=max(spans, default=0))
    prefix = getattr(args, "prefix_token", None)
    if prefix is not None:
        import torch

        if prefix >= model.dims.vocab:
            raise EndlessError(f"--prefix-token {prefix} is not below the vocabulary size {model.dims.vocab}")
        ids = torch.cat([ids.new_tensor([prefix]), ids])
    else:
        trained = getattr(hf.config, "endless_sink_token", None)
        if trained is not None:
            print(f"note: this model was trained with sink token {trained} before every sample; "
                  f"--prefix-token {trained} streams it so", file=sys.stderr)
    results = []
    for pol in policies:
        with bar(total=ids.numel(), desc=pol.spec, unit="tok") as pbar:
            r = evaluate(model, ids, pol, chunk=args.chunk, recompute_every=args.recompute_every, progress=pbar.update)
        results.append(r if prefix is None else without_first(r))
    print(f"{ids.numel()} tokens of {args.text or 'kjv'}, {args.dtype}")
    print(table(results, reference=reference))
    if args.json:
        nll_path = args.json.with_name(args.json.name.removesuffix(".json") + ".nll.safetensors")
        save_nll(results, nll_path, {"text": str(args.text or "kjv"), "model": str(args.fam or args.model)})
        write_json(args.json, {
            "results": [r.as_dict() for r in results],
            "model": args.fam or args.model, "identity": model.identity, "dtype": args.dtype, "weights": args.weights,
            "text": str(args.text or "kjv"), "chunk": args.chunk, "recompute_every": args.recompute_every,
            "threads": args.threads, "prefix_token": prefix,
            "nll": nll_path.name,
        })
    if args.plot:
        context = model.dims.context
        marks = [(context, f"trained context ({context})")] if ids.numel() > context else []
        plot(results, args.plot, smooth=args.smooth, title=title, marks=marks)
    return model, results


def without_first(result):
    """``result`` without its first scored token: with a prefix token, the prediction of the
    text's token 0 from the prefix alone, which a stream without the prefix does not score."""
    from endless.eval.ppl import PplResult, perplexity

    nll = result.nll[1:]
    return PplResult(result.policy, int((~nll.isnan()).sum()), perplexity(nll), result.seconds, nll)


def run(args: argparse.Namespace) -> int:
    run_policies(args, args.policy or list(DEFAULT_POLICIES), title=f"Streaming perplexity ({args.fam or args.model})")
    return 0
