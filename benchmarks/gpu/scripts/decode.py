"""Per-token decode on a GPU: our `sinks:4+1020` stream against transformers' `DynamicCache`.

Same weights, same device, same dtype; each side first reads the same 1,024-token prompt, then
decodes `--steps` tokens (fed from a fixed sequence, so both do identical work), timed with the
device synchronised around the loop. Reports tokens per second per stream and in total, at each
batch size. The issue asks for the figures (a faster GPU path is later work).

    python benchmarks/gpu/scripts/decode.py --json OUT.json [--batches 1,16] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(model, ids: torch.Tensor, prompt: int, steps: int) -> float:
    from endless.stream import Stream

    stream = Stream(model, "sinks:4+1020", batch=ids.shape[0], chunk=256)
    stream.feed(ids[:, :prompt], logprobs=False)
    for i in range(4):  # warm-up: kernels, allocator
        stream.feed(ids[:, prompt + i : prompt + i + 1], logprobs=False)
    _sync(model.device)
    t0 = time.perf_counter()
    for i in range(steps):
        stream.feed(ids[:, prompt + 4 + i : prompt + 5 + i], logprobs=False)
        stream.next_token()
    _sync(model.device)
    return (time.perf_counter() - t0) / steps


@torch.inference_mode()
def time_transformers(hf, ids: torch.Tensor, prompt: int, steps: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache()
    out = hf(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True)
    for i in range(4):
        out = hf(input_ids=ids[:, prompt + i : prompt + i + 1], past_key_values=cache, use_cache=True)
    _sync(ids.device)
    t0 = time.perf_counter()
    for i in range(steps):
        out = hf(input_ids=ids[:, prompt + 4 + i : prompt + 5 + i], past_key_values=cache, use_cache=True)
        out.logits[:, -1].argmax(-1)
    _sync(ids.device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    from endless.device import describe, resolve_device
    from endless.transformer import Transformer
    from endless.models import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    hf, _ = load(args.model, dtype=args.dtype, device=device)
    model = Transformer(hf)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        ids = torch.randint(0, model.dims.vocab, (b, args.prompt + args.steps + 8),
                            generator=torch.Generator().manual_seed(0)).to(device)
        ours = time_ours(model, ids, args.prompt, args.steps)
        theirs = time_transformers(hf, ids, args.prompt, args.steps)
        rows.append({"batch": b, "ours_ms": ours * 1e3, "transformers_ms": theirs * 1e3,
                     "ours_tok_s": b / ours, "transformers_tok_s": b / theirs, "ratio": theirs / ours})
        print(f"batch {b:3d}: sinks:4+1020 {ours * 1e3:7.2f} ms/step ({b / ours:8.0f} tok/s)   "
              f"transformers DynamicCache {theirs * 1e3:7.2f} ms/step ({b / theirs:8.0f} tok/s)   "
              f"ratio {theirs / ours:.2f}x")
    result = {"device": describe(device), "dtype": args.dtype, "prompt": args.prompt, "steps": args.steps,
              "torch": torch.__version__, "rows": rows,
              "command": "python benchmarks/gpu/scripts/decode.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                     if v is not None and k != "json")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
