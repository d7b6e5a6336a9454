"""Test set-up: one torch thread (two processes with two threads each on two cores slow down
by an order of magnitude), and a private cache for everything but the real embedded model."""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    if "real" not in request.keywords:
        monkeypatch.setenv("ENDLESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2 (float32), loaded once for the few tests marked ``real``."""
    from endless.models import load

    os.environ.setdefault("ENDLESS_CACHE", os.path.expanduser("~/.cache/endless"))
    return load("smollm2-135m", dtype="float32")
