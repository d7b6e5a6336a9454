"""What a policy's state offers (docs/methods.md section 4).

Two roles, two protocols:

- ``Cache``: what ``endless.transformer.Transformer.forward`` calls. The model drives one forward pass:
  ``begin(n)`` once for the ``n`` new tokens (the cache prepares positions, slots, mask and RoPE
  tables shared by every layer), ``attend(layer, q, k, v)`` per layer with the un-rotated new
  queries/keys/values (the cache writes them and returns the attention output, as mlx-lm's and
  gpt-fast's caches do with update-and-fetch), ``end()`` once the last layer is done.
- ``PolicyState``: what ``endless.stream.Stream`` holds. ``forward(ids)`` reads any number of
  tokens up to the state's ``chunk`` (the FAM state cuts them at block boundaries, runs the model
  on each piece and updates its memory between pieces: the one place a state calls the model,
  because the FAM update is a computation of the model's layers on the memory rows);
  ``state_tensors``/``load_tensors`` snapshot and restore it exactly.

``endless.policies.states.make_state`` builds the state of a policy: ``RingKV`` for dense,
window, sinks and BSWA; ``RecomputeState``; ``FamState``.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    def begin(self, n: int) -> None: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def end(self) -> None: ...


class PolicyState(Protocol):
    policy: object
    batch: int
    chunk: int
    t: int  # tokens read (the policy's prefix included)

    def forward(self, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_tensors(self, tensors: dict[str, torch.Tensor], t: int) -> None: ...


__all__ = ["Cache", "PolicyState"]
