"""PassKey accuracy (docs/methods.md section 3, "Results to reproduce": Fig. 3a).

Contract: an example counts as correct when greedy decoding right after the prompt reproduces
the key exactly -- with a tokenizer, the first run of digits in the decoded continuation equals
the key; without one (the tiny from-scratch task), the generated token ids equal the answer's.

The model reads the prompt through the streaming ``Stream`` (chunked feed, then token-by-token
greedy decoding), so what is measured is what a user streaming an endless input gets: constant
memory whatever the length. Examples of one length are read together as a batch of streams.
``method="parallel"`` instead scores with ``endless.fam.parallel_forward`` and teacher forcing
(greedy decoding is exact iff every answer token is the argmax given the previous ones); it is
for the static-query ablation, which the streaming state does not implement.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from endless.data.passkey import Example, answer_positions
from endless.policies.spec import BSWA, FAM, Policy, parse_policy
from endless.transformer import Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PasskeyResult:
    """Accuracy of ``policy`` on ``n`` examples of ``length`` prompt tokens (key at ``depth``;
    ``None``: averaged over every depth evaluated)."""

    policy: str
    length: int
    accuracy: float
    n: int
    depth: float | None = None
    loss: float | None = None  # mean answer loss (nats per token), when measured

    def as_dict(self) -> dict:
        return asdict(self)


def _correct(generated: list[int], example: Example, tokenizer) -> bool:
    """Exact match: the first digits generated are the key's, all of them. What follows the
    answer is not scored (training scores the answer only, and a fine-tuned model may run on
    into more digits: "6049459" answers 60494)."""
    if tokenizer is None:
        return generated[: len(example.answer)] == example.answer
    m = re.search(r"\d+", tokenizer.decode(generated, skip_special_tokens=True))
    return bool(m) and m.group(0)[: len(example.key)] == example.key


@torch.inference_mode()
def _stream_batch(model: Transformer, policy: Policy, batch: list[Example], tokenizer, chunk: int) -> list[bool]:
    from endless.stream import Stream

    stream = Stream(model, policy, batch=len(batch), chunk=chunk)
    stream.feed(torch.tensor([e.prompt for e in batch]), logprobs=False)
    # one more token than the answer with a tokenizer: "7" vs " 7" splits may differ by one
    steps = max(len(e.answer) for e in batch) + (1 if tokenizer is not None else 0)
    out: list[list[int]] = [[] for _ in batch]
    for _ in range(steps):
        tok = stream.next_token()
        for row, t in zip(out, tok.tolist(), strict=True):
            row.append(t)
        stream.feed(tok[:, None], logprobs=False)
    return [_correct(g, e, tokenizer) for g, e in zip(out, batch, strict=True)]


def _parallel_prompt(model: Transformer, policy: Policy, what: str):
    """The FAM prompt the parallel schedule runs ``policy`` with: the model's trained one, else
    the neutral prompt (as a stream does); None for BSWA. Refuses other policies."""
    from endless.fam import FamPrompt

    if not isinstance(policy, (FAM, BSWA)):
        raise ValueError(f"{what} is for fam/bswa policies, not {policy.spec}")
    if not (isinstance(policy, FAM) and policy.fam):
        return None
    prompt = getattr(model, "fam_prompt", None)
    return prompt if prompt is not None else FamPrompt.neutral(model, policy.fam)


@torch.inference_mode()
def _parallel_batch(model: Transformer, policy: Policy, batch: list[Example]) -> list[bool]:
    from endless.fam import parallel_forward

    prompt = _parallel_prompt(model, policy, "the parallel method")
    ids = torch.tensor([e.ids for e in batch])
    pred = parallel_forward(model, ids, policy, prompt).argmax(-1)
    return [pred[b, answer_positions(e)].tolist() == e.answer for b, e in enumerate(batch)]


def passkey_accuracy(
    model: Transformer,
    policy: "Policy | str",
    examples: list[Example],
    *,
    tokenizer=None,
    batch: int = 8,
    chunk: int = 256,
    method: str = "stream",
    progress: Callable[[int], None] | None = None,
) -> list[bool]:
    """Correctness of each example (see the module docstring), in the order given."""
    policy = parse_policy(policy)
    correct = [False] * len(examples)
    for group in _groups(examples, batch):
        items = [examples[i] for i in group]
        if method == "stream":
            ok = _stream_batch(model, policy, items, tokenizer, chunk)
        elif method == "parallel":
            ok = _parallel_batch(model, policy, items)
        else:
            raise ValueError(f"unknown method {method!r}")
        for i, flag in zip(group, ok, strict=True):
            correct[i] = flag
        if progress is not None:
            progress(len(group))
    return correct


def _groups(examples: list[Example], batch: int) -> list[list[int]]:
    """Indices in batches of at most ``batch`` examples of equal prompt length (a batch of
    streams advances in lockstep; a parallel batch needs one length)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(examples)), key=lambda i: len(examples[i].prompt)):
        if groups and len(groups[-1]) < batch and len(examples[groups[-1][0]].prompt) == len(examples[i].prompt):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def passkey_answer_loss(model: Transformer, policy: "Policy | str", examples: list[Example], *,
                        batch: int = 8) -> list[float]:
    """Each example's answer loss: mean cross-entropy (nats per token) of its answer tokens given
    the prompt and the answer's earlier tokens, through ``endless.fam.parallel_forward`` (FAM and
    BSWA policies; an untrained FAM without ``model.fam_prompt`` gets the neutral prompt).

    Finer than exact match while a model learns: a five-digit key scores 0 until every digit is
    right, the loss moves with each digit (2.3 nats is a uniform guess among ten digits).
    """
    import torch.nn.functional as F

    from endless.fam import parallel_forward

    policy = parse_policy(policy)
    prompt = _parallel_prompt(model, policy, "the answer loss")
    out = [0.0] * len(examples)
    for group in _groups(examples, batch):
        items = [examples[i] for i in group]
        n = max(len(e.ids) for e in items)
        ids = torch.zeros(len(items), n, dtype=torch.long)
        select = torch.zeros(len(items), n, dtype=torch.bool)
        targets = []
        for b, e in enumerate(items):
            ids[b, : len(e.ids)] = torch.tensor(e.ids)
            select[b, answer_positions(e)] = True
            targets += e.answer
        logits = parallel_forward(model, ids, policy, prompt, select=select)
        losses = F.cross_entropy(logits.float(), torch.tensor(targets), reduction="none")
        for i, part in zip(group, losses.split([len(e.answer) for e in items]), strict=True):
            out[i] = float(part.mean())
    return out


def summarize(policy: str, examples: list[Example], correct: list[bool], *, by_depth: bool = False,
              losses: list[float] | None = None) -> list[PasskeyResult]:
    """Accuracy (and mean answer loss, when ``losses`` are given) per prompt length, and per
    depth with ``by_depth``, sorted by length."""
    if len(correct) != len(examples) or (losses is not None and len(losses) != len(examples)):
        raise ValueError("one correctness flag (and one loss) per example")
    cells: dict[tuple, list[int]] = {}
    for i, e in enumerate(examples):
        cells.setdefault((len(e.prompt), e.depth if by_depth else None), []).append(i)
    return [
        PasskeyResult(policy, length, sum(correct[i] for i in v) / len(v), len(v), depth,
                      None if losses is None else round(sum(losses[i] for i in v) / len(v), 4))
        for (length, depth), v in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0))
    ]


def table(results: Iterable[PasskeyResult]) -> str:
    """Policies as rows, lengths as columns, accuracy in the cells (depth-averaged results)."""
    results = [r for r in results if r.depth is None]
    lengths = sorted({r.length for r in results})
    policies = list(dict.fromkeys(r.policy for r in results))
    cell = {(r.policy, r.length): r.accuracy for r in results}
    width = max([len("policy")] + [len(p) for p in policies])
    loss = {(r.policy, r.length): r.loss for r in results if r.loss is not None}
    lines = [f"{'policy':<{width}}  " + "  ".join(f"{n:>6}" for n in lengths)]
    for p in policies:
        vals = [f"{cell[(p, n)]:>6.2f}" if (p, n) in cell else f"{'-':>6}" for n in lengths]
        lines.append(f"{p:<{width}}  " + "  ".join(vals))
        if any((p, n) in loss for n in lengths):
            vals = [f"{loss[(p, n)]:>6.3f}" if (p, n) in loss else f"{'-':>6}" for n in lengths]
            lines.append(f"{'  answer loss':<{width}}  " + "  ".join(vals))
    return "\n".join(lines)


def plot(results: Iterable[PasskeyResult], path, *, title: str = "PassKey") -> None:
    """Accuracy against prompt length (log scale), one line per policy; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from endless.files import save_png

    results = [r for r in results if r.depth is None]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for p in dict.fromkeys(r.policy for r in results):
        pts = sorted((r.length, r.accuracy) for r in results if r.policy == p)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


__all__ = ["PasskeyResult", "passkey_accuracy", "passkey_answer_loss", "summarize", "table", "plot"]
