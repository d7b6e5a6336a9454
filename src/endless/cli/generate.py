"""``endless generate``: stream a continuation of a prompt to stdout, under any policy."""

from __future__ import annotations

import argparse
import resource
import sys
import time

from endless.cli.common import add_model_args, inference_model, load_from_args
from endless.errors import EndlessError
from endless.validate import BIG, MAX_NEW_TOKENS, SEED, TEMPERATURE, int_range


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt, streaming tokens as they are produced",
        description=(
            "Generate a continuation of PROMPT and print it token by token. With --policy "
            "sinks:S+W (StreamingLLM) generation goes on far past the model's trained context "
            "with constant memory; tokens that left the window are forgotten."
        ),
    )
    p.add_argument("prompt", help="the prompt text (use - to read it from stdin)")
    add_model_args(p, dtype_default="auto", compile=True, weights=True, compile_step=True)
    p.add_argument("--policy", default="sinks:4+1020", help="attention policy spec (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS.arg, default=200, help="tokens to generate (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--temperature", type=TEMPERATURE.arg, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=SEED.arg, default=None, help="random seed for sampling")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--stats", type=int_range("--stats", 0, BIG), default=0, metavar="N",
                   help="every N tokens, report position, ms/token and peak RSS on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endless.policies.spec import parse_policy
    from endless.stream import Stream

    policy = parse_policy(args.policy)  # a bad spec fails before the model loads
    if args.prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise EndlessError(f"the prompt on stdin is not UTF-8 text (byte {e.start})") from None
    else:
        prompt = args.prompt
    if not prompt.strip():
        raise EndlessError("empty prompt")
    hf, tok = load_from_args(args)
    stream = Stream(inference_model(hf, compile=args.compile, weights=args.weights, kernel=args.kernel,
                            compile_step=args.compile_step), policy)
    if args.chat:
        if getattr(tok, "chat_template", None) is None:
            raise EndlessError("this model's tokenizer has no chat template; drop --chat")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids[0]
    stream.feed(ids, logprobs=False)
    stop = () if args.no_stop or tok.eos_token_id is None else (tok.eos_token_id,)
    out: list[int] = []
    shown = ""
    clock = time.perf_counter()
    for t in stream.generate(args.max_new_tokens, temperature=args.temperature, seed=args.seed, stop=stop):
        out.append(t)
        if args.stats and len(out) % args.stats == 0:
            now = time.perf_counter()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"\n[generated {len(out)} (stream at {stream.position}): "
                  f"{1000 * (now - clock) / args.stats:.1f} ms/token, peak RSS {peak:.1f} MB]", file=sys.stderr)
            clock = now
        text = tok.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return 0
