"""The configuration and result of the from-scratch PassKey experiment (``endless.train.tiny``):
one budget shared by every policy (validated on construction: a bad flag is one line naming it)
and one trained policy. Apart from the training loop so that the checkpoint format
(``endless.train.tiny_checkpoint``) needs no training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from endless.data.passkey import MIN_VOCAB
from endless.errors import EndlessError
from endless.eval.passkey import PasskeyResult
from endless.train.states import UNEXPLORED_SOURCES
from endless.transformer import Transformer
from endless.validate import BATCH, BIG, LR, MINUTES, SEED, Rule, check_fields, ordered, probability, rules

# Every number of ``TinyConfig``, with its accepted range: ``endless train fam-tiny`` parses its flags
# with these (``RULES[name].arg``) and ``TinyConfig`` checks itself with them (one wording for both).
RULES = rules(
    Rule("steps", int, 1, BIG), MINUTES, BATCH, LR, Rule("min_len", int, 1, BIG), Rule("max_len", int, 1, BIG),
    Rule("digits", int, 1, 64), Rule("block", int, 1, 1 << 16), Rule("fam", int, 1, 1024),
    Rule("eval_examples", int, 1, BIG), Rule("vocab", int, MIN_VOCAB, 1 << 20), Rule("kv_heads", int, 1, 4),
    Rule("ffn", int, 1, 1 << 16), Rule("init_std", float, 0.0, 10.0, open_low=True), Rule("out_std", float, 0.0, 10.0),
    Rule("warmup", int, 0, BIG), probability("rsp"), Rule("rsp_after", int, 0, BIG), Rule("carry", int, 0, BIG),
    probability("carry_p"), Rule("carry_after", int, 0, BIG), probability("key_depth"), Rule("grad_cap", int, 0, BIG),
    Rule("curriculum_loss", float, 0.0, 100.0, open_low=True), probability("unexplored"),
    Rule("unexplored_after", int, 0, BIG), SEED,
)
OPTIONAL = ("minutes", "out_std", "key_depth")  # None: not given


@dataclass(frozen=True)
class TinyConfig:
    """One budget shared by every policy of the experiment."""

    steps: int = 1500
    batch: int = 128  # the recurrence, not the batch, dominates the time: 128 costs 3x 32
    lr: float = 3e-3
    min_len: int = 16  # whole sequence (prompt + answer), as in docs/methods.md
    max_len: int = 96
    digits: int = 4
    block: int = 8
    fam: int = 4
    memories: tuple[int, ...] = (0, 1)
    eval_lengths: tuple[int, ...] = (96, 384, 6144)
    eval_examples: int = 100
    vocab: int = 128
    kv_heads: int = 2  # of 4 heads (endless.models.tiny's GQA default)
    ffn: int = 128  # MLP width
    init_std: float = 0.07  # initializer_range of the random weights (0.02 learns 3x slower)
    out_std: float | None = None  # std of the o_proj/down_proj weights (None: init_std)
    warmup: int = 100  # steps of linear warm-up
    cosine: bool = True  # cosine decay to zero (constant lr: 0.30 at 96 tokens, cosine: 0.88)
    rsp: float = 0.0  # random state passing: probability of starting from the last final FAM
    rsp_after: int = 0  # ... from this step on (docs/methods.md: enable once the task is learned)
    carry: int = 0  # *ours*: the key may sit in a no-gradient prefix of up to this many tokens (0: off)
    carry_p: float = 0.5  # ... with this probability per step
    carry_after: int = 0  # ... from this step on
    carry_grad: bool = False  # *ours*: back-propagate through the prefix too (a long sequence, key early)
    key_depth: float | None = None  # where the key sits in training and test prompts (None: uniform at random)
    grad_cap: int = 0  # *ours*: a graded carried prefix back-propagates through at most this many tokens (0: all)
    curriculum: tuple[int, ...] = ()  # carry lengths, grown stage by stage (RMT's curriculum; empty: --carry)
    curriculum_loss: float = 0.05  # ... next stage once the carried batches' mean loss is below this
    unexplored: float = 0.0  # unexplored states: probability that a sequence starts from an explored state
    unexplored_after: int = 0  # ... from this step on
    unexplored_from: str = "batch"  # "batch": the last step's final FAMs, permuted; "noise": drawn like them
    minutes: float | None = None  # stop training after this many minutes (the cosine follows the clock)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, RULES, OPTIONAL)
        ordered("--min-len", self.min_len, "--max-len", self.max_len)
        if not 2 * self.digits + 2 <= self.min_len:  # the whole sequence: prompt and answer
            raise EndlessError(f"--min-len must be at least {2 * self.digits + 2} (2 x --digits + 2), got {self.min_len}")
        if self.carry and self.carry < self.block:
            raise EndlessError(f"--carry must be 0 or at least one block ({self.block} tokens)")
        self._check_recipe()

    def _check_recipe(self) -> None:
        """The curriculum, gradient cap and unexplored-state options: one line naming the flag."""
        if self.grad_cap % self.block:
            raise EndlessError(f"--grad-cap must be 0 or a positive multiple of the block ({self.block} tokens)")
        stages = self.curriculum
        if stages and (self.carry or any(n < self.block for n in stages) or list(stages) != sorted(set(stages))):
            raise EndlessError(f"--curriculum must be increasing carry lengths of at least one block ({self.block} "
                               "tokens), given instead of --carry")
        if self.unexplored_from not in UNEXPLORED_SOURCES:
            raise EndlessError(f"--unexplored-from must be one of {', '.join(UNEXPLORED_SOURCES)}")

    @property
    def longest_hold(self) -> int:
        """The longest carried prefix any stage asks for (0: no carry)."""
        return max(self.curriculum, default=self.carry)


@dataclass
class TinyRun:
    """One trained policy: its model (prompt attached as ``model.fam_prompt``), losses, results."""

    policy: str
    model: Transformer
    losses: list[float]
    seconds: float
    results: list[PasskeyResult] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # curriculum: {"step", "length"} where each carry stage began


__all__ = ["TinyConfig", "TinyRun", "RULES"]
