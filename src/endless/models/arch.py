"""Which architectures our forward path supports, and a stable identity for a model's weights."""

from __future__ import annotations

import hashlib

import torch

from endless.errors import EndlessError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_model_type(kind, *, where: str = "architecture") -> None:
    """Refuse a model type our forward path does not implement, naming the ones it does."""
    if kind not in SUPPORTED_MODEL_TYPES:
        raise EndlessError(
            f"{where} {kind!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM, TinyLlama)"
        )


def check_supported(config) -> None:
    """Refuse configs our forward path cannot run exactly: other architectures, dynamic RoPE."""
    check_model_type(getattr(config, "model_type", None))
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if kind in ("dynamic", "longrope"):
        raise EndlessError(
            f"RoPE scaling {kind!r} is not supported: it changes the rotary frequencies with the "
            "current sequence length, which a streaming cache (positions counted inside the cache) "
            "cannot follow; use a model with static RoPE (default, linear, yarn or llama3)"
        )


def model_identity(model: torch.nn.Module) -> str:
    """A string that changes when the architecture or the weights change (saved streams check it).

    Hashes the config sizes and a sample of every parameter (first and last 64 values), so two
    models differing in any layer's weights, LoRA merges included, get different identities.
    """
    cfg = model.config
    h = hashlib.sha256()
    for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "intermediate_size"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).float().cpu()  # the same on every device
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return f"{cfg.model_type}-{cfg.num_hidden_layers}x{cfg.hidden_size}-{h.hexdigest()[:16]}"
