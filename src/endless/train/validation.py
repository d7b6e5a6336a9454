"""Held-out validation for ``endless train fam``: the answer loss of PassKey keys that the window
cannot see, measured along a run, and the best state kept (docs/methods.md section 3, "Training").

Why: the training loss does not say when a run is at its best. On SmolLM2 a run at a constant 3e-3
read a key's first digit from memory at step 60 and had lost it by step 120 while its training loss
still fell (docs/experiments/fam-notebook.md 7.3, "Longer at a high rate"): the training examples mix
keys inside the window, which block attention reads without any memory, with keys outside it. The
validation examples hold only the second kind, so their loss moves with the memory alone.

Contract:

- ``validation_examples``: ``n`` examples of ``length`` tokens in the paper's PassKey format (one
  question), keys from a fixed seed of their own (neither the training data's nor ``eval passkey``'s),
  depths evenly spread over those whose key sentence ends before the first block the answer's first
  prediction attends to (with ``BxM``: its own block and the ``M`` before it). So every example is
  answered from the FAM or not at all; for BSWA, not at all.
- ``validation_loss``: the mean over the examples of each one's answer loss (``passkey_answer_loss``,
  the parallel schedule), each process scoring its share and the sums reduced over processes: every
  rank gets the same number.
- ``Validator``: runs ``validation_loss`` at a step, records the curve and offers the state to a
  ``Best``: a copy of the trainable tensors (LoRA and prompt) at the lowest loss seen; ``keep_best``
  puts them back, so the checkpoint written at the end and the module returned are that state.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import torch

from endless.data.passkey import KEY_SENTENCE, Example, PasskeyFormat, random_key
from endless.errors import EndlessError
from endless.policies.spec import FAM

if TYPE_CHECKING:
    from accelerate import Accelerator

    from endless.fam import FamPrompt
    from endless.train.fam import FamModule
    from endless.transformer import Transformer

log = logging.getLogger(__name__)

VAL_SEED = "endless train fam validation"  # a string seed: no integer --seed of a run or an eval draws these keys


def validation_examples(fmt: PasskeyFormat, policy: FAM, length: int, n: int, digits: int) -> list[Example]:
    """``n`` PassKey examples of ``length`` tokens, every key outside the answer's window (module
    docstring). Raises ``EndlessError`` when ``length`` leaves no room for such a key."""
    rng = random.Random(VAL_SEED)
    keys = [random_key(rng, digits) for _ in range(n)]
    fixed = fmt.fixed_tokens(digits)
    n_fill = length - fixed
    if n_fill < 0:
        raise EndlessError(f"--val-len must be at least {fixed} tokens (the PassKey prompt without filler)")
    # the answer's first token is predicted at position length - 1; it attends from this position on
    seen_from = ((length - 1) // policy.block - policy.memory) * policy.block
    out = []
    for j, key in enumerate(keys):
        sentence = len(fmt.tok(KEY_SENTENCE.format(key=key), add_special_tokens=False).input_ids)
        # filler tokens that may precede the key (all of it when the window ends within the question)
        room = min(seen_from - len(fmt.instruction) - sentence, n_fill)
        if room < 0:
            raise EndlessError(f"--val-len {length} leaves no room for a key outside the window of "
                               f"{policy.spec} ({(policy.memory + 1) * policy.block} tokens): use a longer --val-len")
        before = room * (2 * j + 1) // (2 * n)  # evenly spread over [0, room]
        out.append(fmt.example(length, before / n_fill if n_fill else 0.0, key))
    return out


def validation_loss(model: Transformer, prompt: FamPrompt | None, policy: FAM, examples: list[Example],
                    acc: Accelerator, batch: int) -> float:
    """Mean answer loss of ``examples`` (module docstring), the same on every process."""
    from endless.eval.passkey import passkey_answer_loss

    mine = examples[acc.process_index::acc.num_processes]
    model.fam_prompt = prompt  # read by the parallel schedule (``None``: BSWA has none)
    losses = passkey_answer_loss(model, policy, mine, batch=batch) if mine else []  # F = 0: BSWA
    total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=acc.device)
    total = acc.reduce(total, reduction="sum")
    return float(total[0] / total[1])


class Best:
    """The trainable tensors at the lowest validation loss so far (module docstring)."""

    def __init__(self) -> None:
        self.loss = float("inf")
        self.step: int | None = None
        self._saved: list[torch.Tensor] = []

    def offer(self, loss: float, step: int, params: list[torch.nn.Parameter]) -> bool:
        """Keep a copy of ``params`` when ``loss`` is the lowest yet; True when it was."""
        if not loss < self.loss:
            return False
        self.loss, self.step = loss, step
        self._saved = [p.detach().clone() for p in params]
        return True

    @torch.no_grad()
    def restore(self, params: list[torch.nn.Parameter]) -> None:
        """Put the kept tensors back into ``params`` (the same list ``offer`` was given)."""
        for p, saved in zip(params, self._saved, strict=True):
            p.copy_(saved)


class Validator:
    """The validation of one run over ``module`` (a ``FamModule``): ``validator(step)`` scores its
    current state, appends ``{"step", "loss"}`` to ``curve`` and offers its trainable tensors to
    ``best``; ``keep_best()`` puts the best state back and returns its step."""

    def __init__(self, examples: list[Example], module: FamModule, acc: Accelerator, batch: int) -> None:
        self.examples, self.module, self.acc, self.batch = examples, module, acc, batch
        self.params = [p for p in module.parameters() if p.requires_grad]  # LoRA and prompt, a fixed order
        self.curve: list[dict] = []
        self.best = Best()

    def __call__(self, step: int) -> float:
        m = self.module
        loss = validation_loss(m.model, m.prompt, m.policy, self.examples, self.acc, self.batch)
        self.curve.append({"step": step, "loss": round(loss, 5)})
        better = self.best.offer(loss, step, self.params)
        log.info("step %d validation loss %.4f%s", step, loss, " (best so far)" if better else "")
        return loss

    def keep_best(self) -> int:
        """Restore the state of the lowest loss into the module; its step."""
        self.best.restore(self.params)
        log.info("kept the state of step %d (validation loss %.4f)", self.best.step, self.best.loss)
        return self.best.step


__all__ = ["validation_examples", "validation_loss", "Best", "Validator", "VAL_SEED"]
