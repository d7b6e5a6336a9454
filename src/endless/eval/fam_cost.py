"""Streaming cost of FAM against BSWA at the same B and M (docs/methods.md section 3: "Memory and time
of FAM within ~1% of BSWA"; issue 6 target: per-token time <= 1.1x, memory constant).

Contract: both policies stream the same tokens on the same model, timed in interleaved rounds
(one block of tokens for FAM, then the same block for BSWA, ...) so that a busy machine slows
both alike and the ratio holds even when absolute times do not. Each round is exactly one
block, so every FAM round includes exactly one FAM update: the ratio is the amortised cost.

- ``decode``: tokens fed one at a time (what generation costs per token).
- ``prefill``: blocks fed as one chunk (what reading a long input costs per token).
- ``state``: bytes of the stream's state after the warm-up and after all timed tokens -- equal,
  since every buffer is allocated at construction.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from endless.policies.spec import FAM, parse_policy
from endless.transformer import Transformer


@dataclass(frozen=True)
class CostResult:
    policy: str
    mode: str  # "decode" or "prefill"
    ms_per_token: float
    tokens: int
    state_bytes_start: int
    state_bytes_end: int

    def as_dict(self) -> dict:
        return asdict(self)


def state_bytes(stream) -> int:
    return sum(t.numel() * t.element_size() for t in stream.state.state_tensors().values())


@torch.inference_mode()
def measure(model: Transformer, fam_spec: str, *, warmup: int = 1024, rounds: int = 8, modes=("decode", "prefill"),
            seed: int = 0) -> list[CostResult]:
    """Per-token time of ``fam_spec`` and of its BSWA (same B, M), interleaved block by block."""
    from endless.stream import Stream

    fam = parse_policy(fam_spec)
    if not isinstance(fam, FAM):
        raise ValueError(f"expected a fam:BxM+F policy, got {fam.spec}")
    specs = [fam.spec, fam.as_bswa().spec]
    bl = fam.block
    g = torch.Generator().manual_seed(seed)
    vocab = model.dims.vocab
    out = []
    for mode in modes:
        streams = {s: Stream(model, s, chunk=bl) for s in specs}
        prefix = torch.randint(0, vocab, (warmup,), generator=g)
        start_bytes = {}
        for s, st in streams.items():
            st.feed(prefix, logprobs=False)
            start_bytes[s] = state_bytes(st)
        spent = {s: 0.0 for s in specs}
        for _ in range(rounds):
            block = torch.randint(0, vocab, (bl,), generator=g)
            for s, st in streams.items():
                t0 = time.perf_counter()
                if mode == "decode":
                    for tok in block:
                        st.feed(tok[None], logprobs=False)
                else:
                    st.feed(block, logprobs=False)
                spent[s] += time.perf_counter() - t0
        n = rounds * bl
        for s, st in streams.items():
            out.append(CostResult(s, mode, 1000 * spent[s] / n, n, start_bytes[s], state_bytes(st)))
    return out


def ratios(results: list[CostResult]) -> dict[str, float]:
    """FAM time / BSWA time per mode."""
    by = {(r.mode, r.policy.split(":")[0]): r for r in results}
    return {mode: by[(mode, "fam")].ms_per_token / by[(mode, "bswa")].ms_per_token
            for mode in {r.mode for r in results}}


__all__ = ["CostResult", "measure", "ratios", "state_bytes"]
