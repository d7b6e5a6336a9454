"""``endless chat``: a multi-turn terminal chat on one endless stream."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args
from endless.validate import MAX_NEW_TOKENS, SEED, TEMPERATURE


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="multi-turn chat that never runs out of context",
        description=(
            "Chat with the model in the terminal. The conversation is one endless stream under "
            "--policy (default StreamingLLM sinks:4+1020): it never runs out of context, but "
            "text that has left the window is FORGOTTEN -- the model cannot recall it. "
            "TransformerFAM (--fam CHECKPOINT) is the answer for real long memory. With "
            "--session FILE the stream is saved after every turn and resumed on the next start. "
            "Type /exit or Ctrl-D to leave."
        ),
    )
    add_model_args(p, dtype_default="auto", compile=True, weights=True, compile_step=True)
    p.add_argument("--policy", default="sinks:4+1020", help="attention policy spec (default: %(default)s)")
    p.add_argument("--session", type=Path, default=None, help="save/resume the conversation in this file")
    p.add_argument("--system", default=None, help="system prompt for a new conversation")
    p.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS.arg, default=512, help="longest reply (default: %(default)s)")
    p.add_argument("--temperature", type=TEMPERATURE.arg, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=SEED.arg, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.chat import Chat
    from endless.policies.spec import parse_policy
    from endless.stream import Stream

    policy = parse_policy(args.policy)
    hf, tok = load_from_args(args)
    model = inference_model(hf, compile=args.compile, weights=args.weights, kernel=args.kernel,
                            compile_step=args.compile_step)
    if args.session and args.session.exists():
        chat = Chat.resume(args.session, model, tok, policy)
        print(f"[resumed {args.session}: {len(chat.messages)} messages, {chat.stream.position} tokens]", file=sys.stderr)
    else:
        chat = Chat(Stream(model, policy), tok, system=args.system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        if interactive:
            print("model> ", end="", flush=True)
        for piece in chat.turn(line.rstrip("\n"), max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.session:
            chat.save(args.session)
    return 0
