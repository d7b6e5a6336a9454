"""``endless eval passkey``: PassKey accuracy at given lengths and depths (docs/methods.md section 3)."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from endless.cli.common import add_model_args, inference_model, load_from_args, write_json
from endless.errors import EndlessError
from endless.validate import BATCH, BIG, CHUNK, SEED, int_range, number_list

DESCRIPTION = (
    "PassKey retrieval in the TransformerFAM paper's format: an instruction, filler text with the pass key "
    "at a chosen depth, and the question; correct when greedy decoding reproduces the key exactly. The model "
    "reads each prompt as a stream (chunked feed, then token-by-token decoding, constant memory), under any "
    "policy (e.g. fam:64x1+16, bswa:64x1, sinks:4+1020) or a trained checkpoint (--fam CHECKPOINT, whose "
    "policy is the default). Prints a table (policies x lengths); --json and --plot save the results."
)




def _configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p, weights=True)
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help="policy to evaluate; repeat for several (default: the checkpoint's, else fam:64x1+16,firstres)")
    p.add_argument("--lengths", type=number_list(int, what="lengths"), default=(1024, 2048, 4096, 8192), metavar="N,N",
                   help="prompt lengths in tokens; under fam/bswa a whole number of blocks makes the answer "
                        "open a new block, whose tokens see the M memory blocks and the FAM only (with M = 0: "
                        "not the question) (default: 1024,2048,4096,8192)")
    p.add_argument("--depths", type=number_list(float, low=0, high=1, what="depths"), default=(0.1, 0.3, 0.5, 0.7, 0.9), metavar="D,D",
                   help="key depths, 0 = start, 1 = just before the question (default: 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--examples", type=int_range("--examples", 1, BIG), default=2, help="examples (random keys) per length and depth (default: %(default)s)")
    p.add_argument("--digits", type=int_range("--digits", 1, 64), default=5, help="digits of the key (default: %(default)s)")
    p.add_argument("--batch", type=BATCH.arg, default=4, help="prompts read together as a batch of streams (default: %(default)s)")
    p.add_argument("--chunk", type=CHUNK.arg, default=256, help="tokens per forward while reading (default: %(default)s)")
    p.add_argument("--seed", type=SEED.arg, default=0, help="seed of the keys (default: %(default)s)")
    p.add_argument("--filler", default=None, metavar="FILE",
                   help="prose instead of the repeated filler sentences: a text file, or kjv / shakespeare")
    p.add_argument("--by-depth", action="store_true", help="also report accuracy per depth")
    p.add_argument("--loss", action="store_true",
                   help="also report the answer loss (nats per answer token, teacher-forced; fam/bswa policies): "
                        "it moves while exact match is still 0")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="plot accuracy against length")
    p.set_defaults(func=run)


def add_to(eval_sub: argparse._SubParsersAction) -> None:
    """Register as ``endless eval passkey``."""
    _configure(eval_sub.add_parser("passkey", help="PassKey accuracy at given lengths and depths", description=DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from endless.data.passkey import PasskeyFormat, random_key
    from endless.eval.passkey import passkey_accuracy, passkey_answer_loss, plot, summarize, table
    from endless.policies.spec import BSWA, FAM, parse_policy

    specs = [parse_policy(s) for s in args.policy or []]  # bad specs fail before the model loads
    if args.loss and any(not isinstance(p, (FAM, BSWA)) for p in specs):
        raise EndlessError("--loss is measured for fam:... and bswa:... policies only")
    if args.filler:
        from endless.data.texts import read_text

        read_text(args.filler)  # a missing or empty file: one line before the model loads
    hf, tok = load_from_args(args)
    model = inference_model(hf, weights=args.weights, kernel=args.kernel)
    if not specs:
        if args.fam:
            from endless.fam.checkpoint import read_meta

            specs = [parse_policy(read_meta(args.fam)["policy"])]
        else:
            specs = [parse_policy("fam:64x1+16,firstres")]  # an untrained FAM: keep the first residual
    prompt = getattr(model, "fam_prompt", None)
    for pol in specs:
        if isinstance(pol, FAM) and pol.fam and prompt is not None and prompt.rows != pol.fam:
            raise EndlessError(f"the checkpoint's FAM prompt has {prompt.rows} rows; {pol.spec} needs {pol.fam}")
    fmt = PasskeyFormat(tok, filler=args.filler)
    need = fmt.fixed_tokens(args.digits)
    short = [n for n in args.lengths if n < need]
    if short:
        raise EndlessError(f"a PassKey prompt with a {args.digits}-digit key needs at least {need} tokens; got {short[0]}")
    rng = random.Random(args.seed)
    examples = [fmt.example(n, d, random_key(rng, args.digits))
                for n in args.lengths for d in args.depths for _ in range(args.examples)]
    results = []
    for pol in specs:
        with tqdm(total=len(examples), desc=pol.spec, disable=not sys.stderr.isatty()) as bar:
            correct = passkey_accuracy(model, pol, examples, tokenizer=tok, batch=args.batch, chunk=args.chunk,
                                       progress=bar.update)
        losses = passkey_answer_loss(model, pol, examples, batch=args.batch) if args.loss else None
        results += summarize(pol.spec, examples, correct, losses=losses)
        if args.by_depth:
            results += summarize(pol.spec, examples, correct, by_depth=True, losses=losses)
    print(table(results))
    if args.by_depth:
        for r in results:
            if r.depth is not None:
                loss = "" if r.loss is None else f", answer loss {r.loss:.3f}"
                print(f"{r.policy}  length {r.length}  depth {r.depth:.2f}: {r.accuracy:.2f} ({r.n}){loss}")
    if args.json:
        write_json(args.json, {
            "results": [r.as_dict() for r in results],
            "model": args.fam or args.model,
            "identity": model.identity,
            "depths": list(args.depths),
            "examples_per_cell": args.examples,
            "filler": args.filler or "the paper's sentences",
        })
    if args.plot:
        name = Path(args.fam).name if args.fam else args.model
        plot(results, args.plot, title=f"PassKey ({name})")
    return 0
