"""``endless info``: what a model is, as our runtime sees it."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, load_from_args, write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's architecture, sizes, trained context and cache location",
        description=(
            "Load a model (the embedded smollm2-135m, a transformers folder or a .gguf file) and "
            "print what our runtime sees: architecture and model type, layers, hidden size, "
            "attention heads and KV heads (GQA), head dim, vocabulary, RoPE type and theta, the "
            "trained context length (max_position_embeddings), parameter count, dtype and the "
            "folder the weights are loaded from (for GGUF, the converted cache), and on the CPU "
            "the one-token kernel the packed weights use here (endless.kernels: measured once per "
            "CPU, torch version, model, dtype and thread count, then cached). Refuses "
            "architectures the runtime does not support."
        ),
    )
    add_model_args(p)
    p.add_argument("--kernels", action="store_true",
                   help="time the packed kernels for this model, --dtype and --threads now (and cache the choice); "
                        "without it, the cached choice is shown, or that none was measured yet")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the fields as JSON to PATH")
    p.set_defaults(func=run)


def describe(model, folder: str) -> dict:
    """The fields ``endless info`` prints (and writes as JSON)."""
    from endless.models import model_identity

    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "rope_type": rope.get("rope_type", "default"),
        "rope_theta": rope.get("rope_theta", getattr(cfg, "rope_theta", None)),
        "trained_context": cfg.max_position_embeddings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "identity": model_identity(model),
        "weights": folder,
    }


def kernel_fields(hf, *, measure: bool) -> dict:
    """``kernel`` (the choice, or why there is none) and, once measured, ``kernel_timings``."""
    from endless import kernels
    from endless.transformer import Transformer

    model = Transformer(hf)
    if model.device.type != "cpu":
        return {"kernel": "the modules' own (packed kernels are for the CPU)"}
    choice = kernels.choose(model, refresh=True) if measure else kernels.cached(model)
    if choice is None:
        return {"kernel": "not measured on this machine yet (at the first packed load, or now with --kernels)"}
    return {"kernel": choice.name, "kernel_timings": choice.summary().split(" (", 1)[1].rstrip(")"),
            "kernel_measured": choice.measured}


def run(args: argparse.Namespace) -> int:
    model, _ = load_from_args(args, need_tokenizer=False)
    from endless.device import describe as device_name
    from endless.models import model_identity
    from endless.step import options, unavailable

    fields = describe(model, model.endless_folder)
    fields["device"] = device_name(next(model.parameters()).device)
    fields["identity"] = model_identity(model)
    fields.update(kernel_fields(model, measure=args.kernels))
    weight = next(model.parameters())
    autotuned = "; its products autotuned on this CPU" if options(weight.dtype).get("max_autotune") else ""
    fields["compiled_step"] = (unavailable(weight.device, weight.dtype)
                               or f"available: generate/chat/serve/bench --compile-step (endless.step{autotuned})")
    width = max(map(len, fields))
    for key, value in fields.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        write_json(args.json, fields)
    return 0
