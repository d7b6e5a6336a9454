"""Wrapping a model with peft without a warning the user cannot act on.

peft (0.21) reads transformers' ``is_gradient_checkpointing``, which transformers 5 deprecates with a
FutureWarning on every LoRA wrap and adapter load. The warning concerns peft's code, not ours or the
user's, so exactly that message is silenced around the peft calls; every other warning still shows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence transformers' deprecation of ``is_gradient_checkpointing`` inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
