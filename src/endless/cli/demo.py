"""``endless demo``: the headline demonstration on the embedded model."""

from __future__ import annotations

import argparse
import sys

from endless.cli.common import add_model_args, load_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the headline demo on the embedded model",
        description=(
            "Continue a short prompt with the embedded SmolLM2 under StreamingLLM attention sinks "
            "(sinks:4+124: 4 sink tokens and a rolling 124-token window): generation goes on past "
            "the window with constant memory, printing tokens as they come. Text that left the window "
            "is forgotten."
        ),
    )
    add_model_args(p, dtype_default="bfloat16")
    p.add_argument("--tokens", type=int, default=300, help="tokens to generate (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.stream import Stream

    model, tok = load_from_args(args)
    stream = Stream(model, "sinks:4+124")
    prompt = "In the beginning God created the heaven and the earth."
    print(f"policy sinks:4+124 (a 128-token cache), generating {args.tokens} tokens:\n{prompt}", end="")
    stream.feed(tok(prompt, return_tensors="pt").input_ids[0], logprobs=False)
    out, shown = [], ""
    for t in stream.generate(args.tokens, temperature=0.7, seed=0):
        out.append(t)
        text = tok.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    print(f"\n\n[{stream.position} tokens through a {stream.state.capacity}-slot cache]")
    return 0
