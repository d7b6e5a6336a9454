"""``endless serve``: an OpenAI-compatible HTTP server, one endless stream per conversation."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args
from endless.errors import EndlessError
from endless.validate import BIG, int_range, ordered

log = logging.getLogger(__name__)

DEFAULT_POLICY = "sinks:prefix+1020"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server: conversations as endless streams",
        description=(
            "Serve /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics and a chat page at /. "
            "A conversation id (body field conversation_id or header X-Conversation-Id) keeps a live stream: each "
            "request feeds only its new messages. Under the default policy sinks:prefix+1020 the system prompt and "
            "the chat template's header stay pinned as attention sinks and the window rolls after them; what "
            "leaves the window is forgotten (TransformerFAM, --fam CHECKPOINT, is the answer for memory). "
            "Needs the [serve] extra: pip install 'endless-lm[serve]'."
        ),
    )
    add_model_args(p, dtype_default="auto", compile=True, weights=True, compile_step=True)
    p.add_argument("--policy", default=None,
                   help=f"attention policy of every conversation (default: {DEFAULT_POLICY}; with --fam the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int_range("--port", 0, 65535), default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /metrics")
    p.add_argument("--sessions", type=Path, default=None, metavar="DIR",
                   help="keep conversations in this folder (survive a restart); default: in memory only")
    p.add_argument("--max-sessions", type=int_range("--max-sessions", 1, BIG), default=64, help="conversations held in memory (LRU; default: %(default)s)")
    p.add_argument("--max-batch", type=int_range("--max-batch", 1, 4096), default=16, help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int_range("--max-queue", 0, BIG), default=64, help="requests waiting beyond those; more get 429 (default: %(default)s)")
    p.add_argument("--max-tokens", type=int_range("--max-tokens", 1, BIG), default=4096, help="largest max_tokens a request may ask (default: %(default)s)")
    p.add_argument("--max-prompt-bytes", type=int_range("--max-prompt-bytes", 1, BIG), default=1_000_000,
                   help="largest prompt a request may send, UTF-8 bytes (default: %(default)s)")
    p.add_argument("--no-kv-pool", action="store_true",
                   help="attend per conversation in a batched step instead of over one pool of their caches "
                        "(the reference the pooled attention is measured against)")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace):
    """Validate the flags before anything loads; returns the policy (one line, exit 2, if wrong)."""
    from endless.policies.spec import parse_policy

    if args.fam and args.policy:
        raise EndlessError("give --policy or --fam, not both (a FAM checkpoint brings its own policy)")
    ordered("--max-batch", args.max_batch, "--max-sessions", args.max_sessions)
    if args.sessions is not None and args.sessions.exists() and not args.sessions.is_dir():
        raise EndlessError(f"--sessions {args.sessions} is not a folder")
    if args.fam:
        from endless.fam.checkpoint import read_meta

        policy = parse_policy(read_meta(Path(args.fam))["policy"])
    else:
        policy = parse_policy(args.policy or DEFAULT_POLICY)
    if policy.kind == "recompute":
        raise EndlessError("recompute:W re-runs its window for every token and cannot decode in a batch; "
                           "serve sinks:prefix+W, sinks:S+W, window:W, bswa:BxM or fam:BxM+F")
    if args.compile_step and policy.kind in ("fam", "dense"):
        raise EndlessError(f"--compile-step compiles the decode step of a fixed ring (sinks, window, bswa), "
                           f"not of {policy.spec}: drop it")
    return policy


def run(args: argparse.Namespace) -> int:
    policy = check_args(args)
    try:
        import uvicorn

        from endless.serve.app import create_app
        from endless.serve.engine import Engine
        from endless.serve.protocol import Limits
    except ImportError as e:
        raise EndlessError(f"endless serve needs the [serve] extra ({e.name} is missing): "
                           "pip install 'endless-lm[serve]'") from None
    hf, tok = load_from_args(args)
    model = inference_model(hf, compile=args.compile, weights=args.weights, kernel=args.kernel,
                            compile_step=args.compile_step)
    name = Path(args.fam).name if args.fam else Path(str(args.model)).name
    engine = Engine(model, tok, policy, sessions_dir=args.sessions, max_sessions=args.max_sessions,
                    max_batch=args.max_batch, max_queue=args.max_queue, model_name=name,
                    kv_pool=not args.no_kv_pool)
    if args.compile_step:
        print("endless serve: compiling the decode step before listening (30-90 s a graph)", file=sys.stderr)
        built = engine.compile_step_now()
        print(f"endless serve: a lone conversation decodes through the compiled step under {', '.join(built) or 'no policy'}"
              " (others, and batches of several, decode eagerly)", file=sys.stderr)
    app = create_app(engine, api_key=args.api_key, limits=Limits(args.max_prompt_bytes, args.max_tokens))
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who reaches it can use the model", args.host)
    print(f"endless serve: {name} under {policy.spec} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
