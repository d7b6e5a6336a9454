"""Options shared by every command that runs a model."""

from __future__ import annotations

import argparse
import os

from endless.validate import THREADS

# "auto": bfloat16 where this machine multiplies it natively (CUDA; a CPU with oneDNN's bfloat16
# path), else float32 -- on an AVX2-only CPU bfloat16 has no fast kernels: the demo's dense pass ran
# 4,096 tokens in 253 s against ~20 s in float32 (AMD EPYC Zen 3, benchmarks/bench-zen3)
DTYPES = ("auto", "float32", "bfloat16")


def add_model_args(parser: argparse.ArgumentParser, *, dtype_default: str = "float32", fam: bool = True,
                   compile: bool = False, weights: bool = False, compile_step: bool = False) -> None:
    """--model, --dtype, --threads, (with ``fam``) --fam CHECKPOINT, (with ``compile``) --compile,
    (with ``compile_step``) --compile-step and (with ``weights``, commands whose model goes through ``inference_model``) --weights {auto,int8,int4}.

    --weights is separate from --dtype because it names how the packed weights are stored, not
    what the activations compute in: ``--dtype bfloat16 --weights int8`` is int8 weights with
    bfloat16 activations (issue 21); int8 with float32 activations is refused (``check_weights``)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m), a transformers folder or a .gguf file (default: %(default)s)")
    g.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                   help="compute dtype; float32 is the reference for comparisons; auto: bfloat16 where this machine "
                        "has fast bfloat16 kernels (CUDA, AVX-512 or AMX CPUs), else float32 (default: %(default)s)")
    g.add_argument("--threads", type=THREADS.arg, default=None,
                   help="torch threads (default: all cores); set it when running several jobs at once")
    add_device_arg(g)
    if fam:
        g.add_argument("--fam", default=None, metavar="CHECKPOINT",
                       help="a checkpoint from `endless train fam`: its base model with the LoRA merged and the "
                            "learned FAM prompt (replaces --model; use its fam:BxM+F policy)")
    if weights:
        g.add_argument("--weights", choices=("auto", "int8", "int4"), default="auto",
                       help="how the packed inference weights are stored: auto (in --dtype), int8 (per-channel "
                            "int8, half the bytes; endless.int8) or int4 (groups of 32, a quarter of the bytes "
                            "per decoded token; endless.int4); int8/int4 need --dtype bfloat16, CPU only "
                            "(default: %(default)s)")
    if weights:
        g.add_argument("--kernel", choices=("auto", "default", "onednn", "transposed", "linear"), default="auto",
                       help="the packed weights' CPU kernel: auto (the one measured fastest on this CPU for this model, "
                            "dtype and thread count; timed once, cached, shown by `endless info --kernels`), default "
                            "(the fixed order oneDNN, transposed, F.linear) or one by name (default: %(default)s)")
    if compile:
        g.add_argument("--compile", action="store_true",
                       help="float32: compile the one-token weight products with TorchInductor (1.15-1.5x faster "
                            "per token, 20-60 s at start, one more copy of the weights; needs a C++ compiler)")
    if compile_step:
        g.add_argument("--compile-step", action="store_true",
                       help="decode each token through one compiled graph (endless.step: float32 or bfloat16, "
                            "1.1-1.7x faster per token on the CPU (2.1-2.6x in bfloat16 on an AVX2-only CPU), 30-90 s of "
                            "compilation at the first token (up to ~3 min on a slow CPU), one more copy of the weights; "
                            "needs a C++ compiler)")


def add_device_arg(parser) -> None:
    """--device {auto,cpu,cuda}: where the model runs (auto: CUDA when PyTorch sees a GPU)."""
    from endless.device import CHOICES

    parser.add_argument("--device", choices=CHOICES, default="auto",
                        help="where the model runs; auto: CUDA when there is a GPU, else the CPU (default: %(default)s)")


def device_from_args(args: argparse.Namespace):
    """The torch device of --device (one clear line, exit 2, for cuda without a GPU)."""
    from endless.device import resolve_device

    return resolve_device(getattr(args, "device", "auto"))


def set_threads(args: argparse.Namespace) -> None:
    """torch threads from --threads (default: every core)."""
    import torch

    n = THREADS.check_optional(getattr(args, "threads", None))  # a Namespace built by hand too
    torch.set_num_threads(n or os.cpu_count() or 1)


def load_from_args(args: argparse.Namespace, *, need_tokenizer: bool = True):
    """(hf_model, tokenizer) for the model options of ``args``.

    A folder without tokenizer files is refused with one line unless ``need_tokenizer`` is
    False (then the tokenizer is None). With ``--fam CHECKPOINT`` the model is instead an
    ``endless.transformer.Transformer`` (LoRA merged, ``fam_prompt`` attached, checkpoint-specific
    identity): ``Stream`` and ``as_transformer`` take it as is, ``.hf`` is the transformers model.
    """
    from transformers.utils import logging as hf_logging

    from endless.errors import EndlessError
    from endless.models import load

    resolve_dtype(args)
    if getattr(args, "compile", False) and args.dtype != "float32":
        raise EndlessError("--compile speeds up float32 only (bfloat16 already runs oneDNN's faster kernels); "
                           "add --dtype float32 or drop --compile")
    device = device_from_args(args)
    if getattr(args, "compile", False) and device.type != "cpu":
        raise EndlessError("--compile builds CPU kernels; on --device cuda drop it (PyTorch's CUDA kernels run instead)")
    if getattr(args, "compile_step", False):
        if device.type != "cpu":
            raise EndlessError("--compile-step builds a CPU graph; on --device cuda drop it")
        if getattr(args, "compile", False):
            raise EndlessError("--compile-step replaces --compile (its graph has its own kernels); use one of them")
    weights = getattr(args, "weights", "auto")
    if weights != "auto":  # one line before a model loads: int8 needs bfloat16 on the CPU
        import torch

        from endless.transformer import check_weights

        check_weights(weights, getattr(torch, args.dtype), device, compile=getattr(args, "compile", False))
    set_threads(args)
    hf_logging.disable_progress_bar()  # weight-loading bars are noise on every start
    if getattr(args, "fam", None):
        from endless.fam.checkpoint import load_fam

        model, tok, _ = load_fam(args.fam, dtype=args.dtype, device=device)
    else:
        model, tok = load(args.model, dtype=args.dtype, device=device)
    if tok is None and need_tokenizer:
        raise EndlessError(f"{args.model} has no tokenizer files (tokenizer.json, tokenizer.model, ...); this command needs one")
    return model, tok


def resolve_dtype(args: argparse.Namespace) -> None:
    """Replace ``--dtype auto`` in ``args`` by what it means on this machine (``auto_dtype``, given
    the parsed ``--device``, ``--weights`` and ``--compile`` where the command has them)."""
    if getattr(args, "dtype", None) == "auto":
        args.dtype = auto_dtype(device_from_args(args), weights=getattr(args, "weights", "auto"),
                                compile=getattr(args, "compile", False))


def auto_dtype(device, *, weights: str = "auto", compile: bool = False) -> str:
    """What ``--dtype auto`` means here: bfloat16 on CUDA and on a CPU with oneDNN's bfloat16 path,
    float32 on other CPUs; bfloat16 whenever int8/int4 weights are asked for (they need it), float32
    with ``--compile`` (float32 kernels)."""
    if weights != "auto":
        return "bfloat16"
    if compile:
        return "float32"
    if device.type != "cpu":
        return "bfloat16"
    from endless.cpu import onednn_bfloat16

    return "bfloat16" if onednn_bfloat16() else "float32"


def write_json(path, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` atomically, creating its folder. Every result says
    where it came from: ``command`` (the command line, unless the payload has its own) and
    ``machine`` (CPU, ISA, load, versions: ``endless.bench.timing.machine``), so a figure read
    later names the machine that measured it."""
    import json
    import sys
    from pathlib import Path

    from endless.bench.timing import machine
    from endless.files import atomic_write

    payload = {**payload}
    payload.setdefault("command", "endless " + " ".join(sys.argv[1:]))
    payload.setdefault("machine", machine())
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))


def inference_model(model, *, pack: bool = True, compile: bool = False, weights: str = "auto", kernel: str = "auto",
                    compile_step: bool = False):
    """Our ``Transformer`` over ``model``, with packed inference weights unless ``pack`` is False
    (``endless.packed``: the fast per-token layout, one extra copy of the weights; autograd and
    LoRA still use the modules), with ``compile`` compiled one-token kernels (``endless.gemv``)
    and with ``weights="int8"`` int8 copies instead (``endless.int8``; implies ``pack``); ``kernel``
    as ``Transformer.pack`` (``auto``: the kernel measured fastest here, ``endless.kernels``);
    ``compile_step``: decoded tokens through one compiled graph (``endless.step``)."""
    from endless.stream import as_transformer

    model = as_transformer(model)
    have = model.packed.weights if model.packed is not None else None
    if (((pack or weights != "auto") and (have != weights or model._kernel != kernel))
            or (compile and not (model.packed and (model.packed.compiled or _compiled_timed(model))))):
        model.pack(compile=compile, weights=weights, kernel=kernel)
    if compile_step and model.step is None:
        model.compile_step()
    return model


def _compiled_timed(model) -> bool:
    """The kernel choice timed the compiled kernels already (and found them slower here)."""
    choice = model.kernel_choice
    return choice is not None and "compiled" in choice.ms
