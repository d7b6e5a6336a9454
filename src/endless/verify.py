"""``endless verify``: check our runtime against its oracles on a given model.

- Forward path: our dense logits against transformers' own forward on the same input
  (docs/methods.md section 4: float32 max abs diff <= 1e-4).
- A policy over N tokens: the streaming runtime (chunked, as users run it) against its reference:
  dense while the stream fits the policy's span; for sinks, window and BSWA the naive reference
  that re-rotates the cache contents at in-cache positions every step (``endless.reference``);
  for FAM the exact parallel schedule; for recompute transformers' forward on every window.
Users run this on a new model before trusting it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from endless.policies.spec import FAM, Dense, Policy, Recompute, parse_policy
from endless.stream import Stream
from endless.transformer import Transformer

# One forward pass: transformers and we differ by float32 rounding only (docs/methods.md section 4: 1e-4).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}
# A policy over hundreds of tokens is compared with a reference that orders its sums
# differently at every step (the naive one re-rotates and concatenates); on SmolLM2 (30 layers,
# logits ~25 in magnitude) that rounding reaches ~1.2e-4 over 800 tokens, so streams get 2x.
STREAM_TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 0.5}


@dataclass
class Verdict:
    check: str
    policy: str
    tokens: int
    reference: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _stream_logits(model: Transformer, policy: Policy, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    return Stream(model, policy, chunk=chunk, check_context=False).logits(ids)


@torch.inference_mode()
def _recompute_reference(model: Transformer, policy: Recompute, ids: torch.Tensor) -> torch.Tensor:
    """Every token's window through transformers' own forward (the windows as the policy defines
    them, ``endless.policies.recompute.window_logits``; the forward is the oracle's)."""
    from endless.policies.recompute import window_logits

    def hf_forward(x: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        logits = model.hf(x).logits
        return logits[:, -1:] if last_only else logits

    return window_logits(model, ids, range(ids.shape[1]), policy.window, forward=hf_forward)


def reference_logits(model: Transformer, policy: Policy, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The oracle for ``policy`` on ``ids`` (1, N), and its name."""
    from endless.fam import FamPrompt, parallel_forward
    from endless.reference import naive_stream_logits

    span = policy.span()
    n = ids.shape[1]
    plain = not isinstance(policy, FAM) and not policy.prefix()
    if isinstance(policy, Dense) or (plain and span is not None and n <= span):
        with torch.inference_mode():
            return model.hf(ids).logits, "transformers forward (dense)"
    if isinstance(policy, Recompute):
        return _recompute_reference(model, policy, ids), "transformers forward on every window"
    if isinstance(policy, FAM):
        prompt = getattr(model, "fam_prompt", None)
        if policy.fam and prompt is None:
            prompt = FamPrompt.neutral(model, policy.fam)
        with torch.inference_mode():
            return parallel_forward(model, ids, policy, prompt), "parallel (layer-major) schedule"
    return naive_stream_logits(model, ids, policy), "naive re-rotating reference"


def verify_forward(model: Transformer, ids: torch.Tensor) -> Verdict:
    """Our dense forward against transformers' on ``ids`` (1, N)."""
    ids = ids.to(model.device)
    ours = _stream_logits(model, Dense(), ids, chunk=ids.shape[1])
    with torch.inference_mode():
        ref = model.hf(ids).logits
    diff = (ours.float() - ref.float()).abs().max().item()
    return Verdict("forward", "dense", ids.shape[1], "transformers forward", diff, TOLERANCE.get(model.dtype, 1e-4))


def verify_policy(model: Transformer, policy: "Policy | str", ids: torch.Tensor, *, chunk: int = 128) -> Verdict:
    """The streaming runtime under ``policy`` (fed in chunks) against its reference."""
    policy = parse_policy(policy)
    ids = ids.to(model.device)
    ours = _stream_logits(model, policy, ids, chunk)
    ref, name = reference_logits(model, policy, ids)
    diff = (ours.float() - ref.float()).abs().max().item()
    return Verdict("policy", policy.spec, ids.shape[1], name, diff, STREAM_TOLERANCE.get(model.dtype, 2e-4))


# int8 weights (issue 21) against the float32 forward: the quantisation, not rounding, sets the
# distance. Measured on SmolLM2-135M (64 tokens, logits ~25 in magnitude): max |dlogit| 2.04 for
# int8 against 0.83 for packed bfloat16; the tolerances leave 2x for other models of the family.
# int4 (groups of 32): measured 4.51 on the same tokens; twice that for other models.
LOW_PRECISION_TOLERANCE = {"bfloat16": 2.0, "int8": 4.0, "int4": 8.0}


def verify_int8(model: Transformer, ids: torch.Tensor) -> list[Verdict]:
    """Dense logits with packed bfloat16, with int8 weights (``endless.int8``) and with int4
    weights (``endless.int4``), both with bfloat16 activations, against transformers' forward in ``model``'s dtype (float32: the reference),
    on a bfloat16 copy of the model; the bfloat16 row shows what rounding alone costs."""
    import copy

    ids = ids.to(model.device)
    with torch.inference_mode():
        ref = model.hf(ids).logits.float()
    low = copy.deepcopy(model.hf).to(torch.bfloat16)
    out = []
    for name, kw in (("bfloat16", {"pack": True}), ("int8", {"weights": "int8"}), ("int4", {"weights": "int4"})):
        tol = LOW_PRECISION_TOLERANCE[name]
        ours = _stream_logits(Transformer(low, **kw), Dense(), ids, chunk=1)  # token by token: the decode kernels
        diff = (ours.float() - ref).abs().max().item()
        out.append(Verdict(name, "dense", ids.shape[1], f"transformers forward ({str(model.dtype).removeprefix('torch.')})", diff, tol))
    return out
