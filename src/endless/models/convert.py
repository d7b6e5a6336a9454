"""GGUF files: recognise them, read their architecture, dequantise them once into a cache folder.

Dequantising a GGUF through transformers takes ~20 s for a 135M model, so it is done once and
the result is written as a plain transformers folder (``model.safetensors``, ``config.json``,
tokenizer files). The folder is assembled in a temporary sibling and renamed into place, so an
interrupted conversion never leaves a half-written cache entry: either the whole folder is
there or nothing is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch

from endless.errors import EndlessError
from endless.models.arch import check_model_type, check_supported

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# llama.cpp writes Mistral, SmolLM and TinyLlama as "llama"; transformers maps them back.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def check_gguf(path: Path) -> None:
    """Refuse a file without the GGUF magic bytes before any library tries to parse it."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise EndlessError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


class _Header:
    def __init__(self, f) -> None:
        self.f = f

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError("file ends inside the GGUF header")
        return struct.unpack("<" + fmt, data)[0]

    def string(self) -> str:
        n = self.read("Q")
        if n > 1 << 24:
            raise ValueError(f"implausible string length {n}")
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError("file ends inside the GGUF header")
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.read(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            sub, n = self.read("I"), self.read("Q")
            if sub in _SCALARS:  # skip without decoding
                self.f.seek(n * struct.calcsize("<" + _SCALARS[sub]), os.SEEK_CUR)
                return None
            for _ in range(n):
                self.value(sub)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_header(path: Path) -> dict:
    """Architecture and layout of a GGUF file from its header, without loading any tensor.

    Walks the metadata and the tensor table (a fraction of a second, where the gguf package's
    reader takes seconds on a 49k-token vocabulary) and checks that the file is long enough to
    hold every tensor, so a truncated download is refused before transformers spends seconds on
    it. Returns ``{"architecture", "version", "tensors", "expected_size", "size"}``.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    check_gguf(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            h = _Header(f)
            f.seek(4)
            version = h.read("I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            n_tensors, n_meta = h.read("Q"), h.read("Q")
            meta = {}
            for _ in range(n_meta):
                key, kind = h.string(), h.read("I")
                meta[key] = h.value(kind)
            end = 0
            for _ in range(n_tensors):
                h.string()  # name
                dims = [h.read("Q") for _ in range(h.read("I"))]
                qtype, offset = h.read("I"), h.read("Q")
                block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
                count = 1
                for d in dims:
                    count *= d
                end = max(end, offset + count // block * nbytes)
            align = int(meta.get("general.alignment") or 32)
            data_start = -(-f.tell() // align) * align
    except (EOFError, ValueError, KeyError, struct.error) as e:
        raise EndlessError(f"{path} is a damaged or truncated GGUF file: {e}") from None
    arch = meta.get("general.architecture")
    if not arch:
        raise EndlessError(f"{path} is a damaged GGUF file: no general.architecture in its header")
    if size < data_start + end:
        raise EndlessError(f"{path} is a truncated GGUF file: {size:,} bytes, its tensors need {data_start + end:,}")
    return {"architecture": str(arch), "version": version, "tensors": n_tensors,
            "expected_size": data_start + end, "size": size}


def fingerprint(path: Path) -> str:
    """A cache key for a file's content: its size and the sha256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary folders left by killed conversions (their process is gone) are deleted."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


def convert_gguf(path: Path, target: Path) -> None:
    """Dequantise ``path`` (float32) into a transformers folder at ``target``, atomically."""
    kind = read_gguf_header(path)["architecture"]
    check_model_type(GGUF_ARCHITECTURES.get(kind, kind), where=f"{path.name}: GGUF architecture")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.warning("converting %s once (dequantising GGUF takes ~20 s); cached at %s", path.name, target)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # gguf/transformers raise many kinds (IndexError, ValueError, OSError) on damage
        first = (str(e).splitlines() or [""])[0][:160]
        raise EndlessError(f"cannot read {path} as a model (truncated or corrupt?): {type(e).__name__}: {first}") from None
    check_supported(model.config)
    # The weights are plain floats now. transformers refuses save_pretrained on a model loaded
    # from GGUF, so the folder is written piece by piece without the quantization marker.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from safetensors.torch import save_model

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=f".{os.getpid()}.tmp", dir=target.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path}\nfingerprint {fingerprint(path)}\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.warning("converted %s in %.1f s", path.name, time.perf_counter() - t0)
