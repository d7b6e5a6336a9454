"""``endless bench``: latency, memory and bandwidth of our per-token path against the baselines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from endless.cli.common import add_device_arg, device_from_args
from endless.errors import EndlessError
from endless.validate import BIG, THREADS, int_range, number_list


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure per-token latency, memory and bandwidth against transformers and the baselines",
        description=(
            "Per-token decode latency of sinks, dense and recompute and of transformers' own decoding "
            "(and llama.cpp if installed) at several cache lengths, sinks latency and peak RSS up to 64k "
            "tokens into the stream, chunked vs token-by-token perplexity throughput, and the machine's "
            "copy bandwidth. Implementations are timed in interleaved steps, so their ratios hold on a "
            "busy machine; absolute times do not. Runs on 1 torch thread unless --threads says otherwise."
        ),
    )
    p.add_argument("--quick", action="store_true", help="a run of about a minute (float32, small caches, no isolated RSS)")
    p.add_argument("--model", default=None, help="embedded name, transformers folder or .gguf (default: smollm2-135m); "
                   "tiny:FAMILY[:LAYERS] is a random model for smoke tests")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default=None,
                   help="compute dtype(s) (default: both; float32 with --quick)")
    p.add_argument("--threads", type=THREADS.arg, default=1, help="torch threads, recorded in the results (default: %(default)s)")
    add_device_arg(p)
    p.add_argument("--caches", type=number_list(int, low=9, what="cache lengths"), help="cache lengths, e.g. 256,512,1024,2048,4096")
    p.add_argument("--positions", type=number_list(int, low=2, what="positions"), help="stream positions for the sinks sweep, e.g. 1024,4096,16384,65536")
    p.add_argument("--window", type=int_range("--window", 1, BIG), help="sinks window of the position sweep (default 1020; 252 with --quick)")
    p.add_argument("--rounds", type=int_range("--rounds", 1, BIG), help="timed decode steps per implementation and cache length")
    p.add_argument("--ppl-tokens", type=int_range("--ppl-tokens", 2, BIG), help="tokens of text for the perplexity throughput")
    p.add_argument("--no-pack", action="store_true", help="run our path without packed weights (endless.packed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="float32: compiled one-token kernels (endless.gemv), timed beside the uncompiled path "
                        "(default: on for the full run, off with --quick)")
    p.add_argument("--compile-step", action="store_true",
                   help="our sinks path decodes through one compiled graph per token (endless.step; 1-3 min of "
                        "compilation per ring size), timed beside the eager path ('sinks uncompiled')")
    weights = ("auto", "int8", "int4", "int8,int4")
    p.add_argument("--weights", choices=weights, default="auto",
                   metavar="{" + ",".join(w if "," not in w else repr(w) for w in weights) + "}",  # 'int8,int4' is one choice
                   help="int8 / int4 / int8,int4: also time bfloat16 sinks with those weights (endless.int8, "
                        "endless.int4) in the same interleaved rounds, and report each / bfloat16 per cache length "
                        "(needs bfloat16 in --dtype)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' own decoding")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp even if installed")
    p.add_argument("--no-isolated-rss", action="store_true", help="skip the one-process-per-cell peak RSS runs")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw latency vs cache size and vs stream position")
    p.add_argument("--note", action="append", default=[], help="free text stored in the JSON (e.g. the machine's load)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from endless.bench.runner import QUICK, BenchConfig

    base = QUICK if args.quick else BenchConfig()
    device_from_args(args)  # --device cuda without a GPU: one line before anything runs
    changes: dict = {"threads": args.threads, "notes": tuple(args.note), "device": args.device}
    if args.model:
        changes["model"] = args.model
    if args.dtype:
        changes["dtypes"] = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    for name in ("caches", "positions", "rounds"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.rounds is not None:
        changes["position_rounds"] = args.rounds
    if args.window is not None:
        changes["position_window"] = args.window
    if args.ppl_tokens is not None:
        changes["ppl_tokens"] = args.ppl_tokens
    if args.no_pack:
        changes["pack"] = False
    if args.compile is not None:
        changes["compile"] = args.compile
    if args.compile_step:
        changes["compile_step"] = True
    if args.weights != "auto":
        changes["weights"] = args.weights
    if args.no_transformers:
        changes["with_hf"] = False
    if args.no_llamacpp:
        changes["with_llamacpp"] = False
    if args.no_isolated_rss:
        changes["isolated_memory"] = False
    cfg = dataclasses.replace(base, **changes)
    if cfg.weights != "auto" and ("bfloat16" not in cfg.dtypes or not cfg.pack):
        raise EndlessError(f"--weights {cfg.weights} is timed beside bfloat16: add --dtype bfloat16 (or both) and drop --no-pack")
    if min(cfg.caches) <= 8:
        raise EndlessError("cache lengths must be > 8 (4 sinks + a window)")
    if cfg.position_window >= min(cfg.positions):
        raise EndlessError(f"the first stream position must exceed the window ({cfg.position_window})")
    if list(cfg.positions) != sorted(cfg.positions):
        raise EndlessError("--positions must be ascending")
    return cfg


def run(args: argparse.Namespace) -> int:
    from endless.bench.report import render, targets
    from endless.bench.runner import run_bench

    cfg = config_from_args(args)
    result = run_bench(cfg, progress=True)  # tqdm bars on stderr
    result["command"] = "endless " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith("endless") else None
    result["targets"] = targets(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
    if args.plot:
        from endless.bench.plot import plot

        plot(result, args.plot)
    print(render(result))
    return 0
