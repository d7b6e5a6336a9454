"""``endless info``: what a model is, as our runtime sees it."""

from __future__ import annotations

import argparse
from pathlib import Path

from endless.cli.common import add_model_args, load_from_args, write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's architecture, sizes, trained context and cache location",
        description="Load a model and print its architecture, sizes, trained context length, "
        "dtype and where its converted weights are cached.",
    )
    add_model_args(p)
    p.add_argument("--json", type=Path, default=None, help="also write the fields as JSON")
    p.set_defaults(func=run)


def describe(model, folder: str) -> dict:
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
        "rope_theta": rope.get("rope_theta"),
        "trained_context": cfg.max_position_embeddings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "dtype": str(model.dtype).removeprefix("torch."),
        "weights": folder,
    }


def run(args: argparse.Namespace) -> int:
    from endless.models.load import resolve

    model, _ = load_from_args(args)
    fields = describe(model, str(resolve(args.model)))
    width = max(map(len, fields))
    for key, value in fields.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        write_json(args.json, fields)
    return 0
