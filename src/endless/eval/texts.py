"""Token ids of an evaluation text: a user's file or a built-in corpus (``kjv``, ``shakespeare``).

Contract: ``text_ids`` returns exactly ``n`` token ids from the start of the text (or all of
them with ``n=None``), tokenized without special tokens so every policy scores the same
sequence; a text with fewer tokens than asked, or not longer than ``longer_than`` (the largest
cache evaluated: below it every policy is dense and the comparison says nothing), is a
one-line ``EndlessError``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from endless.data.texts import read_text
from endless.errors import EndlessError

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
