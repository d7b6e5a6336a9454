"""Tiny random models of every supported family, built from a config (tests, experiments)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", **overrides):
    """A 2-layer, d=64, 4-head (2 KV heads) config of ``family``; keyword overrides apply."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    if family == "llama":
        cls = LlamaConfig
    elif family == "mistral":
        cls, base["sliding_window"] = MistralConfig, None
    elif family == "qwen2":
        cls = Qwen2Config  # q/k/v projections with bias
        base["use_sliding_window"] = False
    elif family == "qwen3":
        cls = Qwen3Config  # per-head q/k RMSNorm
        base["use_sliding_window"] = False
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    base.update(overrides)
    return cls(**base)


def tiny_model(family: str = "llama", *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 random causal LM of ``family`` in eval mode, deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    if family == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    return model.eval()
