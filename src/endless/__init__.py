"""endless: run a pretrained transformer LM over an input that never ends.

StreamingLLM attention sinks (training-free) and TransformerFAM feedback attention memory
(learned), on one exact forward path over Llama-family models. Heavy modules load lazily.

    import endless
    model, tok = endless.load("smollm2-135m")
    stream = endless.Stream(model, "sinks:4+1020")
    logprobs = stream.feed(tok(text, return_tensors="pt").input_ids)
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("endless.models", "load"),
    "Stream": ("endless.stream", "Stream"),
    "parse_policy": ("endless.policies.spec", "parse_policy"),
    "Transformer": ("endless.transformer", "Transformer"),
    "EndlessError": ("endless.errors", "EndlessError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'endless' has no attribute {name!r}")


__all__ = list(_LAZY)
