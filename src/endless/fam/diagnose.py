"""Where a trained FAM loses its memory: per-layer diagnostics (*ours*, for docs/methods.md section 3).

Both measurements read PassKey prompts whose key sits in the first block, so everything after
it is filler the FAM has to carry the key through:

- **block share**: per layer, the mean attention mass the FAM-update queries put on the current
  block's keys (the rest goes to the previous FAM's own keys), over the updates a training
  sequence has and over the later ones. It says where the update looks, not how much it writes:
  a state can take most of its attention from every filler block and still hold (measured).
- **swap**: per layer, greedy exact match on the long prompts when, before the last two blocks,
  that layer's FAM is replaced by the FAM the same prompt left after only ``short`` tokens (a
  stream of training length that read the same key). If putting back one layer's FAM restores
  the answer, that layer is where the key was lost; the other layers still hold or do not need it.
"""

from __future__ import annotations

import torch

from endless.attention import gqa_scores
from endless.data.passkey import Example
from endless.fam.memory import fam_positions, fam_qkv
from endless.fam.state import FamState
from endless.policies.spec import FAM
from endless.transformer import Transformer


class _RecordingState(FamState):
    """A ``FamState`` that notes, before every update, each layer's attention share on the block.
    The update itself is the parent's, unchanged (a test checks the logits are identical)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shares: list[list[float]] = []  # per update, per layer

    def _update(self, block: int) -> None:
        bl, f = self.policy.block, self.policy.fam
        pos = fam_positions(block, self.policy)
        start = (block * bl) % self.ring
        row = []
        for i in range(self.model.dims.n_layers):
            fq, fk, _ = fam_qkv(self.model, i, self.fam[i], pos)
            keys = torch.cat([fk, self.k[i, :, :, start : start + bl]], dim=2)
            probs = torch.softmax(gqa_scores(fq * self.model.scale, keys).float(), dim=-1)
            row.append(probs[..., f:].sum(-1).mean().item())
        self.shares.append(row)
        super()._update(block)


def _exact(state: FamState, tail: torch.Tensor, answers: torch.Tensor) -> float:
    """Feed ``tail`` (B, C), decode greedily as many tokens as ``answers`` (B, A) has, and return
    the share of rows reproduced exactly."""
    logits = state.forward(tail, last_only=True)[:, -1]
    out = []
    for _ in range(answers.shape[1]):
        tok = logits.argmax(-1)
        out.append(tok)
        logits = state.forward(tok[:, None], last_only=True)[:, -1]
    return (torch.stack(out, dim=1) == answers).all(dim=1).float().mean().item()


@torch.inference_mode()
def memory_report(model: Transformer, policy: FAM, examples: list[Example], *, short: int, trained_updates: int) -> dict:
    """Block shares and layer swaps (module docstring) on ``examples``: prompts of one length
    with the key in the first block and answers of one length. ``short`` (a multiple of the
    block) is the length of the reference stream; ``trained_updates`` splits the shares into
    the updates a training sequence has and the later ones."""
    if not isinstance(policy, FAM) or not policy.fam:
        raise ValueError("the memory report needs a FAM policy with F > 0")
    bl = policy.block
    n, n_answer = len(examples[0].prompt), len(examples[0].answer)
    if any(len(e.prompt) != n or len(e.answer) != n_answer for e in examples):
        raise ValueError("the memory report needs prompts of one length and answers of one length")
    cut = ((n - 1) // bl - 1) * bl  # two blocks before the question
    if short % bl or not bl <= short <= cut:
        raise ValueError(f"short must be a multiple of {bl} between {bl} and {cut} for {n}-token prompts")
    ids = torch.tensor([e.prompt for e in examples], device=model.device)
    answers = torch.tensor([e.answer for e in examples], device=model.device)
    batch = len(examples)

    reference = FamState(model, policy, batch=batch)
    reference.forward(ids[:, :short])
    held = reference.fam.clone()  # per layer (B, F, d), after short / B updates

    def accuracy(swap: list[int]) -> float:
        state = FamState(model, policy, batch=batch)
        state.forward(ids[:, :cut])
        for layer in swap:  # keyed at the long stream's positions
            state.replace_fam(layer, held[layer])
        return _exact(state, ids[:, cut:], answers)

    recording = _RecordingState(model, policy, batch=batch)
    base = _exact(recording, ids, answers)
    shares = recording.shares[: n // bl]  # updates while reading the prompt
    layers = []
    for i in range(model.dims.n_layers):
        early = [row[i] for row in shares[:trained_updates]]
        late = [row[i] for row in shares[trained_updates:]]
        layers.append({
            "layer": i,
            "block_share_trained": sum(early) / max(1, len(early)),
            "block_share_later": sum(late) / len(late) if late else None,
            "swap_accuracy": accuracy([i]),
        })
    return {
        "length": n, "short": short, "examples": batch, "accuracy": base,
        "all_layers_swapped": accuracy(list(range(model.dims.n_layers))), "layers": layers,
    }


def report_table(report: dict) -> str:
    """The report as a small text table."""
    head = (f"memory at {report['length']} tokens (key in the first block, {report['examples']} prompts): "
            f"exact {report['accuracy']:.2f}; every layer's FAM from {report['short']} tokens: "
            f"{report['all_layers_swapped']:.2f}")
    rows = [f"{'layer':>5}  {'block share (trained updates)':>29}  {'(later)':>8}  {'this FAM from short':>19}"]
    for r in report["layers"]:
        late = "-" if r["block_share_later"] is None else f"{r['block_share_later']:.3f}"
        rows.append(f"{r['layer']:>5}  {r['block_share_trained']:>29.3f}  {late:>8}  {r['swap_accuracy']:>19.2f}")
    return "\n".join([head, *rows])


__all__ = ["memory_report", "report_table"]
