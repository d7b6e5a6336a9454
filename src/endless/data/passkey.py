"""Training and evaluation data for TransformerFAM (docs/methods.md section 3, "PassKey").

- ``passkey_example``: the PassKey task in the paper's exact format (from Landmark Attention):
  an instruction, filler ("The grass is green. ..." repeated), the key sentence at a chosen
  depth, more filler, then the question; the answer is the key's digits. The prompt has exactly
  ``length`` tokens: filler is the filler sentence's tokens cycled, so any length is reachable
  and the key sits at ``depth`` (0 = right after the instruction, 1 = just before the question).
- ``digit_example``: the from-scratch experiment's variant for a tiny vocabulary: random filler
  symbols, a KEY marker followed by the key's digits, a QUERY marker, the digits again.
- ``text_example``: a plain-text window of a corpus (``endless.data.texts``), loss on every token.

Every example is a ``Example`` (prompt ids, answer ids); the loss is on the answer tokens
(``answer_only``) or on every token. Examples are drawn from a ``random.Random`` so a seed fixes
a data set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from endless.errors import EndlessError

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"

# The tiny vocabulary of the from-scratch experiment: digits, two markers, filler symbols.
DIGITS = 10
KEY_MARK = 10
QUERY_MARK = 11
FIRST_FILLER = 12
MIN_VOCAB = FIRST_FILLER + 2  # digits, the two markers and at least two filler symbols


@dataclass(frozen=True)
class Example:
    """A prompt and the answer expected right after it (both lists of token ids)."""

    prompt: list[int]
    answer: list[int]
    key: str = ""
    depth: float = 0.0
    answer_only: bool = True  # loss on the answer tokens only (else on every token)
    spans: tuple[tuple[int, int], ...] = ()  # more supervised answers inside the prompt: [start, end) of their tokens

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.answer


def random_key(rng: random.Random, digits: int) -> str:
    """A key of ``digits`` digits without a leading zero (as the paper's 5-digit keys)."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


FILLER_CHARS = 2_000_000  # of a prose filler: ~500k tokens, more than any prompt needs


class PasskeyFormat:
    """The paper's PassKey pieces tokenized once for a tokenizer (building examples is then cheap).

    ``filler`` replaces the repeated filler sentences by prose: a text (or a built-in corpus name,
    ``kjv``/``shakespeare``) whose tokens are read from an offset that depends on the key, so
    examples differ in their filler too; a memory that only works on a periodic filler is not one."""

    def __init__(self, tokenizer, filler: "str | None" = None) -> None:
        self.tok = tokenizer
        enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        self.instruction = enc(INSTRUCTION)
        self.prose = filler is not None
        if filler is None:
            self.filler = enc(FILLER)
        else:
            from endless.data.texts import read_text

            self.filler = enc(" " + " ".join(read_text(filler)[:FILLER_CHARS].split()))
        self.question = enc(QUESTION)
        self._enc = enc

    def fixed_tokens(self, digits: int, queries: int = 1) -> int:
        """Prompt tokens that are not filler, for a key of ``digits`` digits (and ``queries`` questions)."""
        key = "1" * digits
        return self._fixed(len(self._enc(KEY_SENTENCE.format(key=key))), len(self._enc(ANSWER.format(key=key))), queries)

    def _fixed(self, key_sentence: int, answer: int, queries: int) -> int:
        """Non-filler tokens of a prompt whose key sentence and answer take these many tokens: the
        instruction, the key sentence, the final question and ``queries - 1`` answered questions."""
        return len(self.instruction) + key_sentence + len(self.question) + (queries - 1) * (len(self.question) + answer)

    def example(self, length: int, depth: float, key: str, queries: int = 1) -> Example:
        """A prompt of exactly ``length`` tokens with the key sentence at ``depth`` of the filler.

        ``queries`` > 1 (training only, *ours*): ``queries - 1`` more questions, each followed by
        its answer, at even intervals of the filler after the key; their answers are supervised
        too (``Example.spans``), so one sequence grades the memory ``queries`` times at growing
        distances from the key instead of once."""
        if not 0.0 <= depth <= 1.0:
            raise EndlessError(f"depth must be in [0, 1], got {depth}")
        key_ids = self._enc(KEY_SENTENCE.format(key=key))
        answer = self._enc(ANSWER.format(key=key))
        n_fill = length - self._fixed(len(key_ids), len(answer), queries)
        if n_fill < 0:
            raise EndlessError(f"a PassKey prompt needs at least {length - n_fill} tokens, asked for {length}")
        before = round(depth * n_fill)
        start = int(key) * 7919 % len(self.filler) if self.prose else 0
        fill = [self.filler[(start + i) % len(self.filler)] for i in range(n_fill)]
        prompt = self.instruction + fill[:before] + key_ids
        after, spans, done = n_fill - before, [], before
        for q in range(1, queries):
            cut = before + after * q // queries
            prompt += fill[done:cut] + self.question
            spans.append((len(prompt), len(prompt) + len(answer)))
            prompt += answer
            done = cut
        prompt += fill[done:] + self.question
        return Example(prompt, answer, key=key, depth=depth, spans=tuple(spans))


def passkey_example(tokenizer, length: int, depth: float, *, rng: random.Random, digits: int = 5) -> Example:
    """One PassKey example (see the module docstring); for many, build a ``PasskeyFormat`` once."""
    return PasskeyFormat(tokenizer).example(length, depth, random_key(rng, digits))


def digit_example(length: int, depth: float, *, rng: random.Random, vocab: int, digits: int = 4) -> Example:
    """Tiny-vocabulary PassKey: ``length`` prompt tokens of random filler symbols holding
    ``KEY d1..dn`` at ``depth`` and ending with ``QUERY``; the answer is ``d1..dn``."""
    if vocab < MIN_VOCAB:
        raise EndlessError(f"the digit task needs a vocabulary of at least {MIN_VOCAB}")
    n_fill = length - digits - 2
    if n_fill < 0:
        raise EndlessError(f"a digit PassKey prompt needs at least {digits + 2} tokens")
    key = [rng.randrange(DIGITS) for _ in range(digits)]
    fill = [rng.randrange(FIRST_FILLER, vocab) for _ in range(n_fill)]
    before = round(depth * n_fill)
    prompt = fill[:before] + [KEY_MARK, *key] + fill[before:] + [QUERY_MARK]
    return Example(prompt, key, key="".join(map(str, key)), depth=depth)


def text_example(tokens: list[int], length: int, *, rng: random.Random) -> Example:
    """A random window of ``length + 1`` tokens of a tokenized corpus, loss on every token."""
    if len(tokens) <= length + 1:
        raise EndlessError(f"the text has {len(tokens)} tokens, fewer than the {length + 1} asked for")
    lo = rng.randrange(len(tokens) - length - 1)
    window = tokens[lo : lo + length + 1]
    return Example(window[:-1], window[-1:], answer_only=False)


def collate(examples: list[Example], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, N), targets (B, N)): targets[b, t] is the token to predict after ids[b, t], or
    -100 where no loss is taken. Shorter examples are right-padded (causal: padding after the
    real tokens changes none of their outputs)."""
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    targets = torch.full((len(examples), n), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        seq = torch.tensor(e.ids)
        ids[b, : len(seq)] = seq
        start = len(e.prompt) - 1 if e.answer_only else 0
        targets[b, start : len(seq) - 1] = seq[start + 1 :]
        for lo, hi in e.spans:  # an answer inside the prompt: predicted from the token before each
            targets[b, lo - 1 : hi - 1] = seq[lo:hi]
    return ids, targets


def answer_positions(example: Example) -> slice:
    """Positions whose logits predict the answer tokens."""
    return slice(len(example.prompt) - 1, len(example.ids) - 1)


__all__ = ["Example", "PasskeyFormat", "passkey_example", "digit_example", "text_example", "collate",
           "random_key", "answer_positions", "INSTRUCTION", "FILLER", "KEY_SENTENCE", "QUESTION",
           "KEY_MARK", "QUERY_MARK", "FIRST_FILLER", "MIN_VOCAB"]
