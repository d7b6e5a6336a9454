"""``endless verify``: check our runtime against transformers and the policy references."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, load_from_args, write_json
from endless.errors import EndlessError
from endless.validate import BIG, CHUNK, float_range, int_range

SAMPLE = (
    "The river ran past the old mill, and the miller's daughter counted the sacks of grain "
    "as the carts came in from the fields. "
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check our forward path and a policy against their references",
        description=(
            "Run our forward path and transformers' forward on the same input and report the "
            "max abs logit difference (exit 1 above the tolerance). With --policy, run the "
            "streaming runtime over --tokens tokens in chunks and compare it with the policy's "
            "reference: dense while the stream fits, the naive re-rotating reference for sinks, "
            "window and bswa, the parallel schedule for fam. Run it on a new model before "
            "trusting it."
        ),
    )
    add_model_args(p, dtype_default="float32")
    p.add_argument("--policy", action="append", default=[], help="policy spec to check (repeatable)")
    p.add_argument("--tokens", type=int_range("--tokens", 2, BIG), default=None, help="stream length (default: 64, or 3x the window)")
    p.add_argument("--chunk", type=CHUNK.arg, default=64, help="chunk size of the streaming run (default: %(default)s)")
    p.add_argument("--tolerance", type=float_range("--tolerance", 0.0, 1e6, open_low=True), default=None, help="override the tolerance")
    p.add_argument("--quantized", "--int8", dest="int8", action="store_true",
                   help="also check int8 and int4 weights (--weights int8/int4: bfloat16 activations, endless.int8, "
                        "endless.int4) and packed "
                        "bfloat16 against the forward in --dtype (float32: the reference), token by token")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.set_defaults(func=run)


def _ids(tok, n: int):
    import torch

    text = SAMPLE * (n // 20 + 2)
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    return torch.cat([ids] * (n // ids.shape[1] + 1), dim=1)[:, :n]


def run(args: argparse.Namespace) -> int:
    from endless.policies.spec import parse_policy
    from endless.stream import as_transformer
    from endless.verify import verify_forward, verify_int8, verify_policy

    policies = [parse_policy(s) for s in args.policy]
    hf, tok = load_from_args(args)
    model = as_transformer(hf)
    verdicts = [verify_forward(model, _ids(tok, 64))]
    if args.int8:
        if model.device.type != "cpu":
            raise EndlessError("--int8 checks CPU kernels; run it with --device cpu")
        verdicts += verify_int8(model, _ids(tok, 64))
    for pol in policies:
        span = pol.span() or 64
        n = args.tokens or max(64, 3 * span)
        verdicts.append(verify_policy(model, pol, _ids(tok, n), chunk=args.chunk))
    for v in verdicts:
        if args.tolerance is not None:
            v.tolerance = args.tolerance
        print(f"{v.check:8s} {v.policy:22s} tokens={v.tokens:<6d} vs {v.reference:36s} "
              f"max|diff|={v.max_abs_diff:.3g} (tol {v.tolerance:g}) {'ok' if v.ok else 'FAIL'}")
    ok = all(v.ok for v in verdicts)
    if args.json:
        first = verdicts[-1] if policies else verdicts[0]
        payload = {**first.to_json(), "ok": ok, "checks": [v.to_json() for v in verdicts]}
        write_json(args.json, payload)
    return 0 if ok else 1
