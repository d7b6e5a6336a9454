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

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from endless.errors import EndlessError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temp_prefix(path: Path) -> str:
    """Temporary siblings of ``path`` are named ``.NAME.tmp-PID.*``: hidden (never mistaken for
    state: every reader opens ``path`` itself) and tagged with their writer, so a later save can
    tell a dead writer's leftovers from a live writer's work in progress."""
    return f".{path.name}.tmp-{os.getpid()}."


def clean_stale(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by writers that died (SIGKILL, power loss)
    mid-save; return what was removed. A live writer's temporaries are left alone."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        try:
            pid = int(p.name[len(path.name) + 6 :].split(".", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    if path.exists():  # a folder writer that died after moving the new folder in, before deleting the old
        for p in path.parent.glob(f".{glob_escape(path.name)}.old-*"):
            pid = p.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_failed(path: Path, e: OSError) -> EndlessError:
    """The one line for a save that failed (disk full, read-only, no permission)."""
    why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
    return EndlessError(f"cannot save {path}: {why}; the previous file, if any, is unchanged")


def atomic_write(path: Path, write, *, mode: int = 0o644) -> None:
    """Call ``write(tmp_path)`` then move the finished file over ``path`` with permissions
    ``mode`` (results are world-readable; a saved stream, which may hold a private chat, is
    written 0o600 by ``save_stream``).

    Crash-safe: a reader sees the old file or the new one, never half of one, whenever the
    process dies; a dead writer's temporary file is removed by the next save of ``path``. An
    ``OSError`` while writing (a full disk: ENOSPC) leaves the old file and becomes one
    ``EndlessError`` line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, e) from None
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


def recover_folder(path: Path) -> None:
    """Undo the one non-atomic moment of ``write_folder``: between moving the old folder aside
    (``.NAME.old-PID``) and moving the new one in, ``path`` does not exist. If its writer died
    there, the old folder goes back into place (a live writer is left to finish)."""
    if path.exists() or not path.parent.is_dir():
        return
    for old in sorted(path.parent.glob(f".{glob_escape(path.name)}.old-*")):
        try:
            pid = int(old.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid) or pid == os.getpid():
            try:
                os.replace(old, path)
            except OSError:
                continue
            return


def write_folder(path: "str | Path", fill: Callable[[Path], dict], *, meta_name: str) -> Path:
    """Write a checkpoint folder at ``path`` (replacing one that is there) and return it.

    ``fill(tmp)`` writes the files into the temporary folder and returns the metadata; its
    ``"files"`` entry is set here to the hashes of what ``fill`` wrote. A process killed at any
    moment leaves the old folder or the new one (``recover_folder`` puts the old one back if it
    died between the two renames); a failed write (disk full) leaves the old folder and is one
    ``EndlessError`` line.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(path)
        clean_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        meta = dict(fill(tmp))
        meta["files"] = file_hashes(tmp, skip=meta_name)
        (tmp / meta_name).write_text(json.dumps(meta, indent=2) + "\n")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.chmod(tmp, 0o755)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_folder(path)
        raise write_failed(path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_folder(path)
        raise
    return path


def read_folder_meta(path: "str | Path", *, meta_name: str, fmt: str, what: str, writer: str) -> dict:
    """The verified metadata of the checkpoint folder at ``path``: format ``fmt``, every listed
    file present with its hash. ``what`` names the kind in messages ("FAM checkpoint"), ``writer``
    the command that writes it."""
    path = Path(path)
    recover_folder(path)
    if not path.is_dir():
        raise EndlessError(f"no {what} at {path} (expected a folder written by `{writer}`)")
    try:
        meta = json.loads((path / meta_name).read_text())
    except FileNotFoundError:
        raise EndlessError(f"{path} is not a {what}: {meta_name} is missing") from None
    except (OSError, ValueError) as e:
        raise EndlessError(f"{path / meta_name} is unreadable ({type(e).__name__}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise EndlessError(f"{path} is not a {what} this version can read: format {found!r}, this version reads {fmt}")
    if not isinstance(meta.get("files"), dict):
        raise EndlessError(f"{path / meta_name} lacks 'files'; the checkpoint is damaged")
    for name, sha in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise EndlessError(f"{path} is incomplete: {name} is missing")
        if sha256_file(f) != sha:
            raise EndlessError(f"{path} is corrupt: checksum mismatch in {name}")
    return meta


__all__ = ["atomic_write", "save_png", "sha256_file", "file_hashes", "write_folder", "read_folder_meta",
           "recover_folder", "clean_stale", "write_failed"]
