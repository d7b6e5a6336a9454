"""Files that survive a crash: single files and checkpoint folders written atomically.

``atomic_write`` writes a file through a temporary sibling, fsync and rename, so a reader sees the
old file or the new one, never half of one; ``save_png`` writes a matplotlib figure that way
(every plot of the package). A folder checkpoint (a FAM checkpoint of ``endless train fam``, a tiny model of ``endless train
fam-tiny --save``) is one JSON file of metadata, which lists the sha256 of every other file,
plus those files. Contract: ``write_folder`` builds the folder in a temporary sibling and
renames it into place, so a crash leaves the old folder or the new one, never a mix;
``read_folder_meta`` returns the metadata only when its format matches and every listed file is
present with its hash (otherwise a one-line ``EndlessError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from endless.errors import EndlessError


def atomic_write(path: Path, write, *, mode: int = 0o644) -> None:
    """Call ``write(tmp_path)`` then move the finished file over ``path`` with permissions
    ``mode`` (results are world-readable; a saved stream, which may hold a private chat, is
    written 0o600 by ``save_stream``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(fig, path: "str | Path", **savefig_kwargs) -> None:
    """Save a matplotlib figure as a PNG atomically (dpi 120 unless given), then close it."""
    import matplotlib.pyplot as plt

    savefig_kwargs.setdefault("dpi", 120)
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs))
    finally:
        plt.close(fig)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, *, skip: str) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX names) except the one named ``skip``."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != skip}


def write_folder(path: "str | Path", fill: Callable[[Path], dict], *, meta_name: str) -> Path:
    """Write a checkpoint folder at ``path`` (replacing one that is there) and return it.

    ``fill(tmp)`` writes the files into the temporary folder and returns the metadata; its
    ``"files"`` entry is set here to the hashes of what ``fill`` wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta = dict(fill(tmp))
        meta["files"] = file_hashes(tmp, skip=meta_name)
        (tmp / meta_name).write_text(json.dumps(meta, indent=2) + "\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_folder_meta(path: "str | Path", *, meta_name: str, fmt: str, what: str, writer: str) -> dict:
    """The verified metadata of the checkpoint folder at ``path``: format ``fmt``, every listed
    file present with its hash. ``what`` names the kind in messages ("FAM checkpoint"), ``writer``
    the command that writes it."""
    path = Path(path)
    if not path.is_dir():
        raise EndlessError(f"no {what} at {path} (expected a folder written by `{writer}`)")
    try:
        meta = json.loads((path / meta_name).read_text())
    except FileNotFoundError:
        raise EndlessError(f"{path} is not a {what}: {meta_name} is missing") from None
    except (OSError, ValueError) as e:
        raise EndlessError(f"{path / meta_name} is unreadable ({type(e).__name__}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise EndlessError(f"{path} is not an {fmt} checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if not isinstance(meta.get("files"), dict):
        raise EndlessError(f"{path / meta_name} lacks 'files'; the checkpoint is damaged")
    for name, sha in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise EndlessError(f"{path} is incomplete: {name} is missing")
        if sha256_file(f) != sha:
            raise EndlessError(f"{path} is corrupt: checksum mismatch in {name}")
    return meta


__all__ = ["sha256_file", "file_hashes", "write_folder", "read_folder_meta"]
