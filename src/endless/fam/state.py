"""Streaming TransformerFAM: constant memory, token by token or chunked (docs/methods.md section 3).

Per layer: a ring of (M+1)*B keys/values (the M memory blocks and the current block; the slots
of the block that fell out of the window are overwritten as the new block fills), F extra slots
holding the current FAM's keys/values, and the FAM hidden state (F, d). A token attends to the
memory blocks, the FAM slots and its own block up to itself. When a block completes, every layer
updates its FAM from its own previous FAM and the block's keys/values (``fam_update``), and the
new FAM's keys/values replace the old ones in the FAM slots.

Input is cut at block boundaries so a piece never spans two blocks: chunked feeding is then the
same computation as token by token, and equals ``parallel_forward``. Positions are absolute
stream indices with float64 RoPE angles (exact at any length, see ``endless.rope``); only
distances up to (M+1)*B + F ever occur, all inside the trained context.
"""

from __future__ import annotations

import functools
import logging

import torch

from endless.attention import Kernel, Slots, additive
from endless.fam.memory import FamPrompt, fam_positions, fam_qkv, fam_update, initial_fam
from endless.policies.spec import FAM
from endless.rope import rotate_signed, signed_tables
from endless.transformer import Transformer

log = logging.getLogger(__name__)


@functools.cache
def _warn_untrained(spec: str) -> None:
    """Once per policy and process: a FAM stream without a trained prompt runs an untrained memory."""
    log.warning("%s runs an untrained memory (no checkpoint's prompt): give --fam CHECKPOINT from "
                "`endless train fam` for a memory that remembers", spec)


class FamState:
    """Streaming state of ``batch`` streams under a FAM policy (F=0: BSWA)."""

    def __init__(self, model: Transformer, policy: FAM, *, batch: int = 1, chunk: int = 128,
                 prompt: FamPrompt | None = None) -> None:
        if model.zero_sink:  # the FAM paths (this one and the parallel schedule) use the plain softmax
            from endless.errors import EndlessError

            raise EndlessError("FAM policies do not implement the zero sink (endless_zero_sink in the model's config)")
        self.model = model
        self.policy = policy
        self.batch = batch
        self.chunk = chunk
        d = model.dims
        bl, m, f = policy.block, policy.memory, policy.fam
        # the window's ring, then F slots for the FAM's keys/values, visible to every query
        self.slots = Slots(0, (m + 1) * bl, extra=f)
        self.mask_fn = policy.as_bswa().mask()
        self.kernel = Kernel()
        shape = (d.n_layers, batch, d.n_kv_heads, self.ring + f, d.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.fam = torch.zeros(d.n_layers, batch, f, d.hidden, dtype=model.dtype, device=model.device)
        self.updates = torch.zeros((), dtype=torch.long)  # FAM updates so far (0: next has no residual)
        self.t = 0
        if f:
            if prompt is None:
                prompt = getattr(model, "fam_prompt", None)
            if prompt is None:
                _warn_untrained(policy.spec)
                prompt = FamPrompt.neutral(model, f)
            if prompt.rows != f:
                raise ValueError(f"the FAM prompt has {prompt.rows} rows, the policy {f}")
            with torch.no_grad():
                for i, rows in enumerate(initial_fam(model, prompt)):
                    self.fam[i] = rows
                self._load_fam_kv(0)
        self._step = None
        self._n = 0  # tokens of the piece being read

    @property
    def ring(self) -> int:
        """Slots of the window: the M memory blocks and the current one."""
        return self.slots.ring

    @torch.no_grad()
    def _load_fam_kv(self, block: int) -> None:
        pos = fam_positions(block, self.policy)
        for i in range(self.model.dims.n_layers):
            _, k, v = fam_qkv(self.model, i, self.fam[i], pos)
            self.k[i, :, :, self.ring :] = k
            self.v[i, :, :, self.ring :] = v

    def replace_fam(self, layer: int, rows: torch.Tensor) -> None:
        """Put ``rows`` (B, F, d) in as layer ``layer``'s FAM at a block boundary, keyed at the
        positions the next block reads it at (diagnostics: ``endless.fam.diagnose``)."""
        if self.t % self.policy.block:
            raise ValueError(f"a FAM can only be replaced at a block boundary (position {self.t})")
        self.fam[layer] = rows
        self._load_fam_kv(self.t // self.policy.block)

    @torch.no_grad()
    def _update(self, block: int) -> None:
        """Block ``block`` is complete: every layer updates its FAM (section 3)."""
        bl = self.policy.block
        pos = fam_positions(block, self.policy)
        start = (block * bl) % self.ring
        for i in range(self.model.dims.n_layers):
            fq, fk, fv = fam_qkv(self.model, i, self.fam[i], pos)
            if self.policy.static_query:
                raise NotImplementedError("the static-query ablation is a training experiment only")
            self.fam[i] = fam_update(
                self.model, i, self.fam[i], fq, fk, fv,
                self.k[i, :, :, start : start + bl], self.v[i, :, :, start : start + bl],
                first=int(self.updates) == 0, policy=self.policy,
            )
        self.updates += 1
        self._load_fam_kv(block + 1)

    def begin(self, n: int) -> None:
        """Positions, slots, the BSWA mask (plus the FAM columns) and RoPE tables of the next
        ``n`` tokens, shared by every layer (``endless.attention``, as ``RingKV``)."""
        pos = torch.arange(self.t, self.t + n)
        slots = self.slots.occupy(pos)
        bias = additive(self.slots.visible(pos, self.mask_fn))  # (C, ring + F)
        cos, sin = signed_tables(self.model.rope, pos)
        scale = self.model.scale
        dev = self.k.device  # host-side bookkeeping, moved once per piece for every layer
        g = self.model.dims.n_heads // self.model.dims.n_kv_heads
        bias = bias.to(dev, self.model.dtype).expand(g, -1, -1).contiguous()
        self._step = (slots.to(dev), bias, cos.float(), sin.float(), (cos * scale).float(), (sin * scale).float())
        self._n = n

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        slots, bias, cos, sin, qcos, qsin = self._step
        kbuf, vbuf = self.k[layer], self.v[layer]
        kbuf.index_copy_(2, slots, rotate_signed(k, cos, sin))
        vbuf.index_copy_(2, slots, v)
        return self.kernel.chunk(rotate_signed(q, qcos, qsin), kbuf, vbuf, bias)

    def end(self) -> None:
        """The piece is read; a completed block updates every layer's FAM."""
        self.t += self._n
        if self.t % self.policy.block == 0 and self.policy.fam:
            self._update(self.t // self.policy.block - 1)

    def forward(self, ids: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Feed ids (B, C); pieces never cross a block boundary. Returns logits (B, C or 1, V)."""
        bl = self.policy.block
        outs, lo = [], 0
        while lo < ids.shape[1]:
            n = min(ids.shape[1] - lo, bl - self.t % bl)
            outs.append(self.model.forward(ids[:, lo : lo + n], self, last_only=last_only))
            lo += n
        return outs[-1] if last_only else torch.cat(outs, dim=1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "slot_pos": self.slots.pos, "fam": self.fam, "updates": self.updates}

    def load_tensors(self, tensors: dict[str, torch.Tensor], t: int) -> None:
        """Copy saved (or snapshotted) tensors from any device into this state's buffers."""
        for name, buf in self.state_tensors().items():
            if tuple(tensors[name].shape) != tuple(buf.shape):
                raise ValueError(f"{name}: shape {tuple(tensors[name].shape)} != {tuple(buf.shape)}")
            buf.copy_(tensors[name])
        self.t = t
