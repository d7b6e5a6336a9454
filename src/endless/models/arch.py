"""Which architectures our forward path supports, and a stable identity for a model's weights."""

from __future__ import annotations

import hashlib

import torch

from endless.errors import EndlessError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(config) -> None:
    """Refuse architectures our forward path does not implement, naming the ones it does."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise EndlessError(
            f"architecture {kind!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM, TinyLlama)"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic":
        raise EndlessError(
            "dynamic RoPE scaling changes positions with the sequence length, which a streaming "
            "cache cannot follow; use a model with static RoPE"
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
            sample = torch.cat([flat[:64], flat[-64:]]).float()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return f"{cfg.model_type}-{cfg.num_hidden_layers}x{cfg.hidden_size}-{h.hexdigest()[:16]}"
