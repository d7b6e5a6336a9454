"""Tiny random models of every supported family, built from a config (tests, experiments).

Each family keeps the feature that sets it apart from Llama, so a test over ``FAMILIES``
exercises it: Mistral without a sliding window, Qwen2 with q/k/v biases (randomised, since
they start at zero), Qwen3 with per-head q/k RMSNorm. ``rope="llama3"`` gives a Llama with
Llama 3.1 frequency scaling. No tokenizer: tests feed token ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPES = ("default", "llama3")


def tiny_config(family: str = "llama", *, rope: str = "default", **overrides) -> PretrainedConfig:
    """A 2-layer, d=64, 4-head (2 KV heads, head_dim 16), vocab-128 config of ``family``.

    ``rope="llama3"`` (llama only) sets Llama 3.1 scaling (factor 8, original context 64);
    keyword overrides are config fields and win over everything.
    """
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
    if rope == "llama3":
        if family != "llama":
            raise ValueError("rope='llama3' is a llama option")
        base["rope_parameters"] = {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
    elif rope != "default":
        raise ValueError(f"unknown rope {rope!r}; choose from {ROPES}")
    base.update(overrides)
    return cls(**base)


def tiny_model(family: str = "llama", *, seed: int = 0, rope: str = "default", **overrides) -> PreTrainedModel:
    """A float32 random causal LM of ``family`` in eval mode, deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, rope=rope, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":  # random init leaves biases at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    return model.eval()
