"""Streaming ARC (docs/methods.md section 2, the StreamingLLM paper's Table 5): multiple-choice
questions answered one after another in one unbroken stream.

Contract:
- The stream reads ``Question: <q>\\nAnswer:``, then each choice `` <choice>`` is scored as a
  branch from that point (``Stream.snapshot``/``restore``: every choice sees exactly the same
  state), then the right answer and a blank line are appended and the next question follows.
  The stream thus holds every earlier question with its answer, as in the paper's setup.
- The prediction is the choice with the highest log-likelihood per character (ranked
  classification as in OLMo's ARC evaluation); the unnormalised sum is recorded too.
- ``isolated`` answers each question alone in a fresh dense stream: the reference.
- ``dense`` in a stream stops once the next question would pass the model's trained context
  (the paper's dense run went out of memory); the questions it reached are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from endless.data.arc import Question
from endless.policies.spec import Dense, Policy, parse_policy
from endless.transformer import Transformer

PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Outcome:
    index: int
    position: int  # tokens into the stream when the question was asked
    predicted: int  # by log-likelihood per character
    predicted_sum: int  # by unnormalised log-likelihood
    gold: int

    @property
    def correct(self) -> bool:
        return self.predicted == self.gold

    def as_dict(self) -> dict:
        return asdict(self) | {"correct": self.correct}


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


def _answer(stream, tokenizer, q: Question, index: int) -> Outcome:
    """Read the question, score every choice from the same state, leave the gold answer in."""
    position = stream.position
    stream.feed(_ids(tokenizer, PROMPT.format(question=q.question)), logprobs=False)
    snap = stream.snapshot()
    per_char, total = [], []
    order = [i for i in range(len(q.choices)) if i != q.gold] + [q.gold]  # gold last: no restore after it
    for i in order:
        if i != order[0]:
            stream.restore(snap)
        lp = float(stream.feed(_ids(tokenizer, " " + q.choices[i]))[0].double().sum())
        per_char.append((i, lp / max(1, len(q.choices[i]) + 1)))
        total.append((i, lp))
    stream.feed(_ids(tokenizer, "\n\n"), logprobs=False)
    return Outcome(index, position, max(per_char, key=lambda x: x[1])[0], max(total, key=lambda x: x[1])[0], q.gold)


@torch.inference_mode()
def streaming_arc(model: Transformer, tokenizer, questions: Sequence[Question], policy: "Policy | str", *,
                  chunk: int = 256, progress: Callable[[int], object] | None = None) -> list[Outcome]:
    """Answer ``questions`` in order in one stream under ``policy``."""
    from endless.stream import Stream

    pol = parse_policy(policy)
    dense = isinstance(pol, Dense)
    stream = Stream(model, pol, chunk=chunk, check_context=not dense)
    out = []
    for n, q in enumerate(questions):
        if dense:
            need = len(_ids(tokenizer, PROMPT.format(question=q.question) + " " + q.choices[q.gold] + "\n\n"))
            if stream.position + need > model.dims.context:
                break
        out.append(_answer(stream, tokenizer, q, n))
        if progress is not None:
            progress(1)
    return out


@torch.inference_mode()
def isolated(model: Transformer, tokenizer, questions: Sequence[Question], *,
             progress: Callable[[int], object] | None = None) -> list[Outcome]:
    """Each question alone, in a fresh dense stream (the one-question-at-a-time reference)."""
    from endless.stream import Stream

    out = []
    for n, q in enumerate(questions):
        out.append(_answer(Stream(model, Dense(), chunk=256), tokenizer, q, n))
        if progress is not None:
            progress(1)
    return out


def accuracy(outcomes: Sequence[Outcome]) -> float:
    return sum(o.correct for o in outcomes) / len(outcomes) if outcomes else float("nan")


__all__ = ["Outcome", "PROMPT", "accuracy", "isolated", "streaming_arc"]
