"""Attention policies: frozen, validated configurations and their one compact spec syntax.

Policies are configuration only (no torch state): ``endless.policies.states`` maps each class to
the state that runs it, and ``prefix()`` names the tokens a stream reads before its own (the sink
copies of ``sinks:S+W,sink=#ID``; none for the others).

Every policy is named the same way in the Python API, the CLI, JSON results and plots:

    dense                  keep every key/value (the reference; degrades past the trained context)
    window:W               the query and the W tokens before it (docs/methods.md section 1)
    recompute:W            re-run the model on the last W tokens + the new one, for every token
    sinks:S+W              StreamingLLM: the first S tokens + the W before the query (section 2)
    sinks:S+W,sink=#ID     ... with the sinks' content replaced by S copies of token ID
    sinks:prefix+W         ... with S decided per stream (``PrefixSinks.resolve``): the server
                           pins a conversation's system prompt and template header
    bswa:BxM               block sliding window: own block (causal) + M previous blocks
    fam:BxM+F              TransformerFAM: BSWA plus F feedback-memory rows per layer (section 3)

Positions (docs/methods.md section 2): ``window``, ``sinks`` and ``bswa`` count positions inside the
cache. For ``sinks:4+1020`` the 1024 cached tokens sit at positions 0..1023 and the new token at
1024, forever. With RoPE only position differences matter, so a window key keeps its true
distance to the query and only the sinks' distances are re-counted; ``window:W`` therefore has
the same scores under the cache scheme and under absolute positions (its ``positions`` field
names the scheme). No policy remembers an evicted token: that is what TransformerFAM is for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch

from endless import masks
from endless.errors import EndlessError

SPEC_HELP = (
    "valid policies: dense | window:W | recompute:W | sinks:S+W[,sink=#TOKEN_ID] | sinks:prefix+W | bswa:BxM "
    "| fam:BxM+F[,firstres][,norm][,null[,gate]][,skip0][,noffn|static|detach] "
    "(e.g. sinks:4+1020, window:1024, bswa:64x3, fam:64x1+16)"
)


class _Runs:
    """What every policy tells a stream beyond its mask: sinks kept and tokens read first."""

    n_sinks = 0

    def prefix(self) -> tuple[int, ...]:
        """Token ids every stream reads before its first token (none)."""
        return ()


@dataclass(frozen=True)
class Dense(_Runs):
    """Keep everything. Memory grows with the stream: the reference, not a streaming policy."""

    kind = "dense"

    @property
    def spec(self) -> str:
        return "dense"

    def mask(self) -> masks.MaskFn:
        return masks.causal

    def ring_size(self, chunk: int) -> int | None:
        return None  # unbounded

    def span(self) -> int | None:
        """Largest number of keys one query attends to (None: unbounded)."""
        return None


@dataclass(frozen=True)
class Window(_Runs):
    """Window attention: the query and the ``window`` tokens before it; the oldest is evicted."""

    window: int
    positions: str = "cache"
    kind = "window"

    def __post_init__(self) -> None:
        _positive("window", self.window)
        if self.positions != "cache":
            raise EndlessError(f"window positions must be 'cache', got {self.positions!r}")

    @property
    def spec(self) -> str:
        return f"window:{self.window}"

    def mask(self) -> masks.MaskFn:
        return masks.all_of(masks.causal, masks.recent(self.window))

    def ring_size(self, chunk: int) -> int:
        return self.window + chunk

    def span(self) -> int:
        return self.window + 1


@dataclass(frozen=True)
class Recompute(_Runs):
    """Sliding window with re-computation: every token re-runs the model on its last ``window``
    tokens at positions 0..window (docs/methods.md section 1). O(window^2) per token, by design."""

    window: int
    kind = "recompute"

    def __post_init__(self) -> None:
        _positive("window", self.window)

    @property
    def spec(self) -> str:
        return f"recompute:{self.window}"

    def span(self) -> int:
        return self.window + 1


@dataclass(frozen=True)
class Sinks(_Runs):
    """StreamingLLM (docs/methods.md section 2): the first ``sinks`` tokens plus the ``window`` tokens
    before the query, positions counted inside the cache.

    With ``sink_token`` set, the sinks are S copies of that token placed before the stream (the
    paper's 4"\\n"+1020 experiment): the stream's own first tokens then go through the window
    like any other and are evicted.
    """

    sinks: int
    window: int
    sink_token: int | None = None
    kind = "sinks"

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise EndlessError(f"sinks must be >= 0, got {self.sinks}")
        _positive("window", self.window)
        if self.sinks >= self.window:
            raise EndlessError(f"sinks ({self.sinks}) must be smaller than the window ({self.window})")
        if self.sink_token is not None and self.sink_token < 0:
            raise EndlessError(f"sink token id must be >= 0, got {self.sink_token}")

    @property
    def n_sinks(self) -> int:
        return self.sinks

    @property
    def spec(self) -> str:
        tail = f",sink=#{self.sink_token}" if self.sink_token is not None else ""
        return f"sinks:{self.sinks}+{self.window}{tail}"

    def mask(self) -> masks.MaskFn:
        return masks.all_of(masks.causal, masks.any_of(masks.first(self.sinks), masks.recent(self.window)))

    def ring_size(self, chunk: int) -> int:
        return self.window + chunk

    def span(self) -> int:
        return self.sinks + self.window + 1

    def prefix(self) -> tuple[int, ...]:
        """With ``sink_token``: the S copies that become the sinks."""
        return () if self.sink_token is None else (self.sink_token,) * self.sinks

    def sink_query_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """In-cache position of each query as seen by the sinks: it never exceeds S+W."""
        return positions.clamp(max=self.sinks + self.window)


@dataclass(frozen=True)
class PrefixSinks(_Runs):
    """``sinks:prefix+W``: StreamingLLM whose sinks are a stream's own first S tokens, S chosen
    per stream. ``endless serve`` pins each conversation's system prompt and chat-template header
    this way (they stay visible however long the conversation) and lets the window roll after them.

    A template, not a runnable policy: ``resolve(S)`` gives the ``Sinks(S, W)`` a stream runs
    (saved streams record the resolved spec, so a resume under another S is refused).
    """

    window: int
    kind = "sinks-prefix"

    def __post_init__(self) -> None:
        _positive("window", self.window)

    @property
    def spec(self) -> str:
        return f"sinks:prefix+{self.window}"

    def resolve(self, sinks: int) -> Sinks:
        """The policy of a stream whose first ``sinks`` tokens are pinned (S < W, else EndlessError)."""
        return Sinks(sinks, self.window)

    def span(self) -> int:
        return 2 * self.window  # the largest S is W - 1: S + W + 1 keys


@dataclass(frozen=True)
class BSWA(_Runs):
    """Block Sliding Window Attention (docs/methods.md section 1): blocks of ``block`` tokens; a query
    sees its own block causally and the ``memory`` previous blocks fully."""

    block: int
    memory: int
    kind = "bswa"

    def __post_init__(self) -> None:
        _positive("block", self.block)
        if self.memory < 0:
            raise EndlessError(f"memory blocks must be >= 0, got {self.memory}")

    @property
    def spec(self) -> str:
        return f"bswa:{self.block}x{self.memory}"

    def mask(self) -> masks.MaskFn:
        return masks.all_of(masks.causal, masks.block_window(self.block, self.memory))

    def ring_size(self, chunk: int) -> int:
        return (self.memory + 1) * self.block + chunk

    def span(self) -> int:
        return (self.memory + 1) * self.block


@dataclass(frozen=True)
class FAM(_Runs):
    """TransformerFAM (docs/methods.md section 3): BSWA with blocks of ``block`` tokens and ``memory``
    previous blocks, plus a per-layer working memory of ``fam`` rows updated after every block.

    ``fam=0`` is BSWA exactly. The ablation switches are the paper's negative results and only
    make sense for experiments: ``update_ffn=False`` drops the FFN on the FAM update,
    ``static_query=True`` queries with the initial FAM instead of the previous one, and
    ``detach=True`` stops gradients between updates.

    ``first_residual=True`` (*ours*, flag ``firstres``) keeps the residual from the initial FAM on
    the first update instead of the paper's zero residual. On a pretrained model the paper's
    choice makes the first FAM a lone attention-plus-FFN delta, unlike any hidden state the layer
    has seen, and an untrained FAM then wrecks the model (SmolLM2 PassKey answer loss 8.8 against
    0.6 for BSWA); with the residual the untrained FAM already helps (0.17).

    ``normalize=True`` (*ours*, flag ``norm``) rescales every FAM row to unit RMS after each
    update. The paper's update is a residual sum, so the FAM's norm grows with every block and a
    key written late is a vanishing part of it (docs/experiments/fam-notebook.md section 7.2); on the unit sphere
    the state stays in the range it was trained in however long the stream. For models trained
    with it (from scratch): on a pretrained model unit RMS takes away each layer's own scale and an
    untrained FAM hurts (SmolLM2 PassKey answer loss 4.2 against 0.17 with ``firstres`` alone).

    ``null_slot=True`` (*ours*, flag ``null``) gives the update's softmax one more slot with key 0
    and value 0, the "zero sink" of "Efficient Streaming Language Models with Attention Sinks"
    (Xiao et al. 2023, section 3.3, SoftMax-off-by-One): the FAM rows can put their attention on
    nothing, so a block of filler need not be written into the memory at all. Without it the rows'
    weights sum to one over the FAM and the block, and the first layer's FAM becomes a running
    sum of filler that dilutes the key (docs/experiments/fam-notebook.md section 7.2). No new weights.

    ``gate=True`` (*ours*, flag ``gate``, needs ``null``) scales the update's FFN term of each FAM
    row by that row's attention mass on the real keys (one minus what went to the null slot,
    averaged over heads): a row that attends to nothing is left exactly as it was, where the
    paper's update always adds its FFN's output and so moves every row on every block, key or
    filler. A write gate made of the update's own attention weights, no new weights.

    ``skip_first=True`` (*ours*, flag ``skip0``) never updates layer 0's FAM: its tokens read the
    initial FAM (the prompt's, a constant) on every block, and the memory lives in the layers
    above. Measured on the tiny model with ``gate``: layer 0's rows still put 5.6 % of their
    attention on real keys per filler block where layer 1's put 0.01 %, so layer 0's memory drifts
    with the filler, and with it every token's input to the layers that hold the key.
    """

    block: int
    memory: int
    fam: int
    update_ffn: bool = True
    static_query: bool = False
    detach: bool = False
    first_residual: bool = False
    normalize: bool = False
    null_slot: bool = False
    gate: bool = False
    skip_first: bool = False
    kind = "fam"

    def __post_init__(self) -> None:
        _positive("block", self.block)
        if self.memory < 0 or self.fam < 0:
            raise EndlessError(f"memory blocks and FAM rows must be >= 0, got {self.memory} and {self.fam}")
        if self.gate and not (self.null_slot and self.update_ffn):
            raise EndlessError("fam option gate scales the update's FFN by the attention not given to the null slot: "
                               "it needs null (and the FFN, so not noffn)")

    @property
    def spec(self) -> str:
        flags = [n for n, on in (("noffn", not self.update_ffn), ("static", self.static_query), ("detach", self.detach),
                                 ("firstres", self.first_residual), ("norm", self.normalize),
                                 ("null", self.null_slot), ("gate", self.gate), ("skip0", self.skip_first)) if on]
        return f"fam:{self.block}x{self.memory}+{self.fam}" + "".join(f",{f}" for f in flags)

    def as_bswa(self) -> BSWA:
        return BSWA(self.block, self.memory)

    def span(self) -> int:
        return (self.memory + 1) * self.block + self.fam


Policy = Union[Dense, Window, Recompute, Sinks, PrefixSinks, BSWA, FAM]  # noqa: UP007 (a runtime alias)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise EndlessError(f"{name} must be >= 1, got {value}")


def _parse_window(args: str, kind: str) -> Policy:
    if "+" in args:
        raise EndlessError(f"{kind} has no sinks: use sinks:S+W for attention sinks ({SPEC_HELP})")
    return (Window if kind == "window" else Recompute)(int(args))


def _parse_sinks(args: str, kind: str) -> Policy:
    head, _, opts = args.partition(",")
    if head.startswith("prefix+") and not opts:
        return PrefixSinks(int(head.removeprefix("prefix+")))
    m = re.fullmatch(r"(\d+)\+(\d+)", head)
    if not m:
        raise ValueError(head)
    token = None
    if opts:
        key, _, value = opts.partition("=")
        if key != "sink" or not re.fullmatch(r"#\d+", value):
            raise EndlessError(f"unknown sinks option {opts!r}; the only one is sink=#TOKEN_ID")
        token = int(value[1:])
    return Sinks(int(m.group(1)), int(m.group(2)), sink_token=token)


def _parse_bswa(args: str, kind: str) -> Policy:
    m = re.fullmatch(r"(\d+)x(\d+)", args)
    if not m:
        raise ValueError(args)
    return BSWA(int(m.group(1)), int(m.group(2)))


def _parse_fam(args: str, kind: str) -> Policy:
    head, *flags = args.split(",")
    m = re.fullmatch(r"(\d+)x(\d+)\+(\d+)", head)
    if not m:
        raise ValueError(args)
    known = {"noffn": "update_ffn", "static": "static_query", "detach": "detach", "firstres": "first_residual", "norm": "normalize",
             "null": "null_slot", "gate": "gate", "skip0": "skip_first"}
    unknown = [f for f in flags if f not in known]
    if unknown:
        raise EndlessError(f"unknown fam option {unknown[0]!r}; options: {', '.join(known)}")
    opts = {known[f]: f != "noffn" for f in flags}
    return FAM(int(m.group(1)), int(m.group(2)), int(m.group(3)), **opts)


_PARSERS: dict[str, Callable[[str, str], Policy]] = {
    "window": _parse_window,
    "recompute": _parse_window,
    "sinks": _parse_sinks,
    "bswa": _parse_bswa,
    "fam": _parse_fam,
}


def parse_policy(spec: "str | Policy") -> Policy:
    """Parse a spec such as ``sinks:4+1020``; a policy object is returned unchanged.

    Anything else than a valid spec raises ``EndlessError`` with one line quoting the spec."""
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    if text == "dense":
        return Dense()
    kind, sep, args = text.partition(":")
    if kind not in _PARSERS or not sep:
        raise EndlessError(f"unknown policy {spec!r}; {SPEC_HELP}")
    try:
        return _PARSERS[kind](args, kind)
    except ValueError:
        raise EndlessError(f"cannot parse policy {spec!r}; {SPEC_HELP}") from None
    except EndlessError as e:  # a value out of range: say which spec it came from
        raise EndlessError(f"policy {spec!r}: {e}") from None


def check_fits(policy: Policy, trained_context: int) -> None:
    """Refuse windows the model was never trained for (positions beyond its context)."""
    span = policy.span()
    if span is not None and span > trained_context:
        raise EndlessError(
            f"policy {policy.spec} attends to {span} positions but the model was trained on "
            f"{trained_context}; choose a smaller window"
        )


__all__ = ["Dense", "Window", "Recompute", "Sinks", "PrefixSinks", "BSWA", "FAM", "Policy", "parse_policy", "check_fits", "SPEC_HELP"]
