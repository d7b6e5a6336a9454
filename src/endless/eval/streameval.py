"""StreamEval (docs/methods.md section 2, after LongEval's line retrieval): a stream of lines
``line <key>: REGISTER_CONTENT is <value>``; every ``every`` lines a query asks for the value of
the line ``back`` lines earlier.

Contract:
- ``make_stream(seed, ...)`` is deterministic in its seed; keys are unique within a stream, so
  every query has exactly one right answer (the value of the line it names).
- ``run_streameval`` reads the whole stream through one ``Stream`` under a policy and scores
  each query by greedy exact match: correct iff every token of the value is the argmax given
  the stream and the value's previous tokens, which is exactly "greedy decoding writes the
  value". The right value is then what the stream contains (teacher forcing), so later queries
  see a clean history whatever the model got wrong earlier.
- StreamingLLM does not extend memory: when the asked line is further back than the cache,
  accuracy must be ~0; that is what the ``back`` option and several cache sizes show.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from endless.policies.spec import Dense, Policy, parse_policy
from endless.transformer import Transformer

ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "noisy", "odd", "proud", "quiet", "rapid", "shy", "tidy", "upper", "vivid", "wild", "young",
    "zesty", "bold", "crisp", "deep", "early", "fancy", "grand", "hasty", "inner", "jumpy", "kind", "loyal",
    "misty", "neat", "open", "plain",
)
NOUNS = (
    "anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "ladder", "meadow", "needle", "orchid", "pepper", "quartz", "rabbit", "saddle", "tunnel", "umbrella",
    "valley", "walnut", "yogurt", "zipper", "barrel", "cactus", "donkey", "feather", "goblet", "hammer",
    "igloo", "jungle", "lantern", "magnet", "napkin", "oyster", "parrot", "ribbon", "silver",
)


QUERY = "Question: what is the REGISTER_CONTENT in line {key}?\nAnswer: the REGISTER_CONTENT in line {key} is <"


@dataclass(frozen=True)
class Segment:
    """A piece of the stream: context text, or a query (``text`` ends where the value starts)."""

    text: str
    answer: str | None = None  # the value a query expects (not in ``text``: the reader feeds it)
    line: int | None = None  # index of the line this segment is (None: not a line)
    asked: int | None = None  # index of the line a query asks for


def make_stream(seed: int, lines: int, *, every: int = 10, back: int = 20, digits: int = 5) -> list[Segment]:
    """``lines`` lines with a query after every ``every``-th line (from line ``back`` on) for
    the line written ``back`` lines before the query."""
    if min(lines, every, back, digits) < 1:
        raise ValueError("lines, every, back and digits must be >= 1")
    combos = len(ADJECTIVES) * len(NOUNS)
    if lines > combos:
        raise ValueError(f"at most {combos} lines (unique keys), got {lines}")
    rng = random.Random(seed)
    picks = rng.sample(range(combos), lines)
    keys = [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in picks]
    values = [str(rng.randrange(10 ** (digits - 1), 10**digits)) for _ in range(lines)]
    out = [Segment("Remember the REGISTER_CONTENT of every line; you will be asked for some of them.\n")]
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        out.append(Segment(f"line {key}: REGISTER_CONTENT is <{value}>\n", line=i))
        done = i + 1
        if done % every == 0 and done >= back:
            j = done - back
            out.append(Segment(QUERY.format(key=keys[j]), values[j], asked=j))
            out.append(Segment(">\n"))
    return out


@dataclass(frozen=True)
class Outcome:
    """One query: where it was asked (tokens into the stream), how far back its line was."""

    position: int
    distance: int  # tokens from the start of the asked line to the query
    correct: bool

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def run_streameval(model: Transformer, tokenizer, segments: Sequence[Segment], policy: "Policy | str", *,
                   chunk: int = 256, progress: Callable[[int], object] | None = None) -> list[Outcome]:
    """Read ``segments`` as one stream under ``policy``; one ``Outcome`` per query."""
    from endless.stream import Stream

    pol = parse_policy(policy)
    stream = Stream(model, pol, chunk=chunk, check_context=not isinstance(pol, Dense))
    line_start: dict[int, int] = {}
    outcomes = []
    for seg in segments:
        if seg.line is not None:
            line_start[seg.line] = stream.position
        stream.feed(torch.tensor(tokenizer(seg.text, add_special_tokens=False).input_ids), logprobs=False)
        if seg.answer is not None:
            ok = True
            for t in tokenizer(seg.answer, add_special_tokens=False).input_ids:
                ok &= int(stream.last_logits[0].argmax()) == t
                stream.feed(torch.tensor([t]), logprobs=False)
            outcomes.append(Outcome(stream.position, stream.position - line_start[seg.asked], ok))
        if progress is not None:
            progress(1)
    return outcomes


def stream_text(segments: Sequence[Segment]) -> str:
    """The whole stream as text, values included (what the model reads)."""
    return "".join(seg.text + (seg.answer or "") for seg in segments)


def accuracy_by_length(outcomes: Sequence[Outcome], bucket: int) -> list[tuple[int, float, int]]:
    """(bucket end in tokens, accuracy, queries) for consecutive stretches of ``bucket`` tokens."""
    rows: dict[int, list[bool]] = {}
    for o in outcomes:
        end = ((o.position - 1) // bucket + 1) * bucket
        rows.setdefault(end, []).append(o.correct)
    return [(end, sum(v) / len(v), len(v)) for end, v in sorted(rows.items())]


def plot(curves: dict[str, list[tuple[int, float, int]]], path, *, title: str, distance: float | None = None) -> None:
    """Accuracy against stream length, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")

    import matplotlib.pyplot as plt

    from endless.files import save_png

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for policy, rows in curves.items():
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", ms=3, label=policy)
    ax.set_xlabel("stream length (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title + (f"\n(answers ~{distance:.0f} tokens back)" if distance else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


__all__ = ["Outcome", "Segment", "accuracy_by_length", "make_stream", "plot", "run_streameval", "stream_text"]
