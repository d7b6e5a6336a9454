"""Saving and restoring a stream's state: atomic, checksummed, refusing mismatches.

Format: one safetensors file. Tensors: the policy state (KV buffers and slot indices, or token
history for recompute) and the last logits. Metadata (strings): format version, policy spec,
model identity, compute dtype, the package version that wrote it, position, batch, chunk, and a
sha256 over every tensor's bytes in name order. ``endless-stream/1`` files (no dtype) still load.

Atomic: written to a temporary file in the same folder, fsync'ed, then renamed over the target,
so a crash leaves either the old file or the new one, never half of one. Verified on load: a
truncated, corrupt or tampered file is an ``EndlessError``; so is a file from another model,
policy or dtype, in one line naming every field that differs (saved vs here).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from endless.errors import EndlessError
from endless.files import atomic_write
from endless.policies.spec import parse_policy

FORMAT = "endless-stream/2"
READABLE = (FORMAT, "endless-stream/1")  # /1: the same without dtype and writer


def _digest(tensors: dict[str, torch.Tensor], extra: dict[str, str] | None = None) -> str:
    h = hashlib.sha256()
    for key in sorted(extra or {}):
        h.update(f"{key}={extra[key]}".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()  # a stream on any device hashes its host bytes
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_stream(stream, path: Path, extra: dict[str, str] | None = None) -> None:
    tensors = {f"state.{k}": v.detach().cpu().contiguous() for k, v in stream.state.state_tensors().items()}
    if stream.last_logits is not None:
        tensors["last_logits"] = stream.last_logits.contiguous()
    meta = {
        "format": FORMAT,
        "policy": stream.policy.spec,
        "model": stream.model.identity,
        "dtype": str(stream.model.dtype).removeprefix("torch."),
        "written_by": _version(),
        "t": str(stream.state.t),
        "fed": str(stream.fed),
        "batch": str(stream.batch),
        "chunk": str(stream.chunk),
        "sha256": _digest(tensors, extra),
    }
    for key, value in (extra or {}).items():
        meta[f"extra.{key}"] = value
    # Serialized in memory, then written by Python: a full disk is then a plain OSError(ENOSPC)
    # that atomic_write turns into one line, whatever safetensors' own writer would raise.
    blob = save(tensors, metadata=meta)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob), mode=0o600)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"endless-lm {version('endless-lm')}"
    except PackageNotFoundError:
        return "endless-lm (source)"


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load and verify a state file (format, checksum); raises EndlessError on any damage."""
    if not path.is_file():
        raise EndlessError(f"no saved stream at {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors reports truncation/corruption in several ways
        raise EndlessError(f"{path} is not a readable stream state ({type(e).__name__}: {str(e)[:80]})") from None
    fmt = meta.get("format")
    if fmt not in READABLE:
        if isinstance(fmt, str) and fmt.startswith("endless-stream/"):
            raise EndlessError(f"{path} was saved in {fmt}, a format this version ({_version()}) cannot read; "
                               f"it reads {', '.join(READABLE)}")
        raise EndlessError(f"{path} is not an endless stream state (format {fmt!r})")
    extra = {k.removeprefix("extra."): v for k, v in meta.items() if k.startswith("extra.")}
    if _digest(tensors, extra) != meta.get("sha256"):
        raise EndlessError(f"{path} is corrupt: checksum mismatch")
    return tensors, meta


def load_stream(cls, path: Path, model, policy):
    tensors, meta = read_state(path)
    saved = parse_policy(meta["policy"])
    here_dtype = str(model.dtype).removeprefix("torch.")
    differs = []
    if meta["model"] != model.identity:
        differs.append(f"another model ({meta['model']} vs {model.identity})")
    if meta.get("dtype", here_dtype) != here_dtype:
        differs.append(f"another dtype ({meta['dtype']} vs {here_dtype})")
    if policy is not None and parse_policy(policy) != saved:
        differs.append(f"another policy ({saved.spec} vs {parse_policy(policy).spec})")
    if differs:
        by = f", written by {meta['written_by']}" if "written_by" in meta else " (an older format)"
        raise EndlessError(f"{path} was saved with {', '.join(differs)} (saved vs here){by}")
    stream = cls(model, saved, batch=int(meta["batch"]), chunk=int(meta["chunk"]), check_context=False)
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    try:
        stream.state.load_tensors(state, int(meta["t"]))
    except (KeyError, ValueError) as e:
        raise EndlessError(f"{path} does not match its recorded policy: {e}") from None
    last = tensors.get("last_logits")
    stream.last_logits = None if last is None else last.to(model.device)
    stream.fed = int(meta["fed"])
    stream.saved_extra = {k.removeprefix("extra."): v for k, v in meta.items() if k.startswith("extra.")}
    return stream


__all__ = ["save_stream", "load_stream", "read_state", "atomic_write"]
