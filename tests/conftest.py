"""Test set-up: one torch thread (two processes with two threads each on two cores slow down
by an order of magnitude), and a private cache for everything but the real embedded model."""

import os

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    """$ENDLESS_CACHE is a per-session temporary folder, except in tests marked ``real``."""
    if "real" not in request.keywords:
        monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2 (float32), loaded once for the few tests marked ``real``."""
    from endless.models import load

    os.environ.setdefault("ENDLESS_CACHE", os.path.expanduser("~/.cache/endless"))
    return load("smollm2-135m", dtype="float32")


def write_gguf(path, arch="llama", *, tensors=2):
    """A small well-formed GGUF file with ``arch`` in its header (not a loadable model)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for i in range(tensors):
        w.add_tensor(f"t{i}", np.full((4, 8), i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def make_gguf():
    """``make_gguf(path, arch="llama", tensors=2)`` writes a small header-valid GGUF file."""
    return write_gguf
