"""Which device a model runs on: ``--device {auto,cpu,cuda}`` and ``device=`` in the Python API.

``auto`` is CUDA when PyTorch sees a GPU, else the CPU. Asking for CUDA where there is none is a
user mistake: one line (``EndlessError``), never a traceback from deep inside PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from endless.errors import EndlessError

if TYPE_CHECKING:  # torch loads on first use: the CLI's parser is built without it
    import torch

CHOICES = ("auto", "cpu", "cuda")


def fused_attention(device: "torch.device") -> bool:
    """Whether attention on ``device`` goes through PyTorch's fused ``scaled_dot_product_attention``:
    on CUDA, unless ``ENDLESS_FUSED_ATTENTION=0`` (an escape hatch should a driver's fused kernel
    misbehave; the explicit products then run, as on the CPU)."""
    return device.type == "cuda" and fused_window_attention()


def fused_window_attention() -> bool:
    """Whether the parallel FAM/BSWA schedule's windowed attention goes through PyTorch's fused
    ``scaled_dot_product_attention`` on every device: on CUDA as ``fused_attention``, and on the CPU, where
    PyTorch's flash kernel takes the block mask and keeps no (blocks x window) score tensor for the
    backward pass (a SmolLM2 training step of 1,024 tokens at the paper's B = 1,024: 5.5x faster in
    half the memory; at B = 64 within the machine's noise; benchmarks/fam-train-step).
    ``ENDLESS_FUSED_ATTENTION=0`` gives the einsum products."""
    import os

    return os.environ.get("ENDLESS_FUSED_ATTENTION", "1") != "0"


def resolve_device(device: "str | torch.device | None" = "auto") -> torch.device:
    """A concrete ``torch.device`` for ``auto``/``cpu``/``cuda``/``cuda:N`` (or a device)."""
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EndlessError(f"unknown device {device!r}; choose from {', '.join(CHOICES)} (or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EndlessError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EndlessError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise EndlessError(f"unsupported device {device!r}; choose from {', '.join(CHOICES)} (or cuda:N)")
    return dev


def describe(device: torch.device) -> str:
    """A name for reports: the GPU's model, or "cpu"."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
