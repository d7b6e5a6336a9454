"""``endless train fam``: fine-tune a pretrained model for TransformerFAM (docs/methods.md section 3,
"Training").

LoRA (peft) on the attention and FFN projections plus the F prompt embeddings (*ours*:
initialised from the embeddings of " summary"), trained through the exact parallel schedule
(``endless.fam.parallel_forward``) on PassKey examples in the paper's format, optionally mixed
with plain text. Loss on the answer tokens (``all_tokens``: on every token). Constant learning
rate by default, as the paper; ``warmup`` and ``cosine`` add a linear warm-up and a cosine decay to
zero at the end of the budget (``endless.train.schedule``: steps, or ``minutes`` when the clock ends
first), the tiny model's schedule. Random position offset (RPO) and random state passing (RSP) are flags, off
by default (docs/methods.md: RSP destabilised from-scratch training; with our exact float64 RoPE, RPO
only perturbs float rounding).

On CUDA (``device``: auto picks it when there is a GPU) the same loop runs in float32 with TF32
products (``mixed_precision`` auto or ``"no"``; bf16 autocast, ``"bf16"``, destabilised SmolLM2's
FAM training on the CPU: docs/experiments/fam-notebook.md 7.3), PyTorch's fused attention in the parallel schedule
and, with ``grad_checkpoint``, per-layer activation recomputation for long sequences. Two
budget controls make a run fit a lease: ``minutes`` stops training at a wall-clock limit (the
checkpoint is written all the same), and ``curriculum`` grows the longest training sequence in
stages, i.e. the number of memory updates a key must survive (the curriculum of "Recurrent
Memory Transformer", section 4: add segments once the current count is learned): a stage ends
when the recent answer loss is below ``curriculum_loss``, or when its share of the budget
(steps, or minutes) is spent. The rest of the recipe (``endless.train.states``): ``grad_cap``
back-propagates through the last ``grad_cap`` tokens of a longer sequence only (its start runs
without gradient and hands its FAM on: truncated back-propagation over a long hold, so a
curriculum can reach holds far longer than what fits a backward pass), ``rsp`` from step
``rsp_after`` on, ``unexplored`` states (another sequence's final FAM, or noise), and ``queries``
(ours: more answered questions after the key, every answer graded; ``PasskeyFormat.example``).
``val_every`` measures a held-out answer loss of keys outside the window along the run and
``keep_best`` makes the checkpoint the state at its lowest (``endless.train.validation``).

Runs unchanged under several processes: everything goes through ``accelerate`` (one
``Accelerator``, ``prepare`` of the trainable module and optimizer, DDP gradient all-reduce,
per-rank data, only rank 0 writes). On CPU: ``torchrun --nproc_per_node 2 -m endless.cli.main
train fam ...`` (``accelerate launch --cpu --num_processes 2`` started a single process on the
machine this was developed on); on GPUs and clusters, ``accelerate launch``.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from endless.data.passkey import Example, PasskeyFormat, collate, random_key, text_example
from endless.errors import EndlessError
from endless.fam import FamPrompt, parallel_forward
from endless.peft_quiet import quiet_peft
from endless.policies.spec import BSWA, FAM, parse_policy
from endless.train.curriculum import Stages
from endless.train.schedule import lr_factor
from endless.train.states import UNEXPLORED_SOURCES, graded_cut, passed_state, unexplored_start
from endless.train.validation import Validator, validation_examples
from endless.transformer import Transformer
from endless.validate import BATCH, BIG, LR, MINUTES, SEED, Rule, check_fields, choice, ordered, probability, rules

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RPO_MAX = int(2 * math.pi * 1e4)  # docs/methods.md: offset ~ U(0, 2*pi*10^4)
MIXED_PRECISION = ("auto", "no", "bf16")

# Every number of ``FamTrainConfig``, with its accepted range: ``endless train fam`` parses its flags
# with these (``RULES[name].arg``) and the config checks itself with them (one wording for both).
RULES = rules(
    Rule("steps", int, 1, BIG), Rule("warmup", int, 0, BIG), Rule("save_every", int, 0, BIG), BATCH, LR,
    Rule("prompt_lr", float, 0.0, None, open_low=True),
    Rule("lora_rank", int, 1, 4096), Rule("lora_alpha", float, 0.0, None, open_low=True),
    Rule("min_len", int, 1, BIG), Rule("max_len", int, 1, BIG), Rule("digits", int, 1, 64),
    probability("max_depth"), probability("text_fraction"), probability("rsp"), SEED, Rule("log_every", int, 1, BIG),
    MINUTES, Rule("curriculum_loss", float, 0.0, 100.0), Rule("rsp_after", int, 0, BIG), Rule("grad_cap", int, 0, BIG),
    probability("unexplored"), Rule("unexplored_after", int, 0, BIG), Rule("queries", int, 1, 64),
    probability("align"), Rule("val_every", int, 0, BIG), Rule("val_examples", int, 1, BIG),
    Rule("val_len", int, 0, BIG),
)


@dataclass(frozen=True)
class FamTrainConfig:
    """Everything a run depends on; stored in the checkpoint's ``fam.json``."""

    model: str = "smollm2-135m"
    # *ours*: ``firstres`` by default, since the paper's zero first residual makes an untrained FAM
    # wreck a pretrained model (docs/experiments/fam-notebook.md 7.3: PassKey answer loss 8.75 against 0.17)
    policy: str = "fam:64x1+16,firstres"
    steps: int = 300
    batch: int = 1  # per process
    lr: float = 1e-3  # 3e-4 learnt nothing in 250 steps; every SmolLM2 run of results 7.3 used 1e-3
    prompt_lr: float = 3e-3
    warmup: int = 0  # steps of linear warm-up of both rates
    cosine: bool = False  # cosine decay of both rates to zero at the end of the budget (default: constant)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    min_len: int = 128  # prompt tokens, PassKey examples
    max_len: int = 1024
    digits: int = 5
    max_depth: float = 1.0  # the key's depth is drawn uniformly in [0, max_depth] (1: anywhere)
    queries: int = 1  # *ours*: questions per PassKey example, every answer graded (1: the paper's format)
    # *ours*: share of steps whose prompt length is a whole number of blocks, so that the answer opens a
    # new block as in `eval passkey` at such lengths (with M = 0 its digits then see only the FAM); at
    # uniform lengths that happens for ~digits/B of the steps (docs/experiments/fam-notebook.md 7.3)
    align: float = 0.0
    text: str | None = None  # a corpus name (kjv, shakespeare) or a text file
    text_fraction: float = 0.0
    all_tokens: bool = False
    rpo: bool = False
    rsp: float = 0.0  # probability of starting from the previous step's final FAM
    rsp_after: int = 0  # ... from this step on (the paper's RSP after a warm-up)
    prompt_init: str = " summary"
    init: str | None = None  # a checkpoint to train further (its policy, LoRA shape and prompt)
    dtype: str = "float32"
    seed: int = 0
    log_every: int = 10
    device: str = "auto"  # auto: CUDA when there is a GPU
    mixed_precision: str = "auto"  # auto: none (float32; TF32 products on CUDA); "bf16": autocast
    grad_checkpoint: bool = False  # recompute each layer in the backward pass (long sequences)
    minutes: float | None = None  # stop training after this many minutes (the checkpoint is still written)
    save_every: int = 0  # also write the checkpoint every this many steps, to ``{out}-step{N}`` (0: only at the end)
    # held-out PassKey answer loss, keys outside the window (``endless.train.validation``): before the
    # first step, every ``val_every`` steps and after the last (0: never), on ``val_examples`` prompts
    # of ``val_len`` tokens (0: ``max_len``); ``keep_best``: the checkpoint is the state at its lowest
    val_every: int = 0
    val_examples: int = 16
    val_len: int = 0
    keep_best: bool = False
    curriculum: tuple[int, ...] = ()  # longest training sequence of each stage (the last: max_len)
    curriculum_loss: float = 0.0  # a stage ends early once its recent answer loss is below this
    rsp_shuffle: bool = False  # RSP from the final FAM of a random sequence of the previous batch
    filler: str | None = None  # prose (a file, kjv, shakespeare) instead of the paper's filler sentences
    grad_cap: int = 0  # *ours*: back-propagate through at most this many tokens of a sequence (0: all)
    unexplored: float = 0.0  # unexplored states: probability that a sequence starts from an explored state
    unexplored_after: int = 0  # ... from this step on
    unexplored_from: str = "batch"  # "batch": the last step's final FAMs, permuted; "noise": drawn like them

    def __post_init__(self) -> None:
        check_fields(self, RULES, optional=("minutes",))
        ordered("--min-len", self.min_len, "--max-len", self.max_len)
        choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        choice("unexplored_from", self.unexplored_from, UNEXPLORED_SOURCES)
        if self.keep_best and not self.val_every:
            raise EndlessError("--keep-best needs --val-every: the best state is chosen by the validation loss")
        if self.grad_cap:
            block = parse_policy(self.policy).block
            if self.grad_cap % block:
                raise EndlessError(f"--grad-cap must be 0 or a whole number of blocks ({block} tokens), got {self.grad_cap}")
        if self.curriculum:
            c = tuple(self.curriculum)
            if list(c) != sorted(c) or c[0] < self.min_len or c[-1] > self.max_len:
                raise EndlessError(f"--curriculum lengths must ascend within [--min-len, --max-len] = "
                                   f"[{self.min_len}, {self.max_len}], got {','.join(map(str, c))}")


@dataclass
class FamTrainResult:
    """What a process got out of ``train``: the trained module (eval mode) on every rank."""

    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1
    is_main: bool = True
    module: FamModule | None = None
    tokenizer: object = None
    stages: list = field(default_factory=list)  # {"step", "length"}: where each curriculum stage began
    device: str = "cpu"
    validation: list = field(default_factory=list)  # {"step", "loss"}: the held-out curve (``val_every``)
    best_step: int | None = None  # the step whose state the checkpoint holds (``keep_best``), else None


class _Offset:
    """RoPE tables at positions shifted by ``offset`` (RPO): the same scores in exact maths."""

    def __init__(self, rope, offset: int) -> None:
        self.rope, self.offset = rope, offset

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.rope.tables(positions + self.offset, dtype)


class FamModule(nn.Module):
    """The trainable whole (LoRA-wrapped model + FAM prompt) as one module, so DDP sees every
    trainable parameter and its gradient hooks fire in one forward/backward."""

    def __init__(self, peft_model: nn.Module, prompt: FamPrompt | None, policy: FAM) -> None:
        super().__init__()
        self.peft = peft_model
        self.prompt = prompt  # None for BSWA (F=0): nothing but LoRA is trained
        self.policy = policy
        self.grad_checkpoint = False
        self.model = Transformer(peft_model.base_model.model)  # our forward path over the LoRA modules

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, offset: int = 0,
                init_state: list[torch.Tensor] | None = None, fresh: torch.Tensor | None = None):
        """(mean loss over targeted positions, final FAM per layer). ``offset``: the position of
        ``ids[:, 0]`` in its stream; ``init_state``/``fresh`` as ``parallel_forward``'s."""
        keep = targets != -100  # the LM head only where a target is scored
        logits, state = parallel_forward(self._at(offset), ids, self.policy, self.prompt, init_state=init_state,
                                         return_state=True, select=keep, fresh=fresh, checkpoint=self.grad_checkpoint)
        return F.cross_entropy(logits.float(), targets[keep]), state

    @torch.no_grad()
    def hold(self, ids: torch.Tensor, offset: int = 0, init_state: list[torch.Tensor] | None = None,
             fresh: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The final FAM per layer after ``ids``, without gradient: the ungraded start of a long
        sequence (``FamTrainConfig.grad_cap``)."""
        none = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # no logits are needed
        _, state = parallel_forward(self._at(offset), ids, self.policy, self.prompt, init_state=init_state,
                                    return_state=True, select=none, fresh=fresh)
        return state

    def _at(self, offset: int) -> Transformer:
        """Our forward path with RoPE positions starting at ``offset`` (the same scores in exact maths)."""
        if not offset:
            return self.model
        model = copy.copy(self.model)
        model.rope = _Offset(self.model.rope, offset)
        return model


def build(cfg: FamTrainConfig, hf_model, tokenizer) -> FamModule:
    """Wrap ``hf_model`` with LoRA and create the prompt from ``cfg.prompt_init``.

    A ``bswa:BxM`` (or F=0) policy trains LoRA alone: the baseline with the same budget."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise EndlessError("training needs peft: pip install 'endless-lm[train]'") from None
    policy = parse_policy(cfg.policy)
    if isinstance(policy, BSWA):
        policy = FAM(policy.block, policy.memory, 0)
    if not isinstance(policy, FAM):
        raise EndlessError(f"train fam needs a fam:BxM+F or bswa:BxM policy, got {policy.spec}")
    hf_model.requires_grad_(False)
    if cfg.init is not None:
        return _resume(cfg, hf_model, policy)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), bias="none")
    with quiet_peft():
        peft_model = get_peft_model(hf_model, lora)
    prompt = None
    if policy.fam:
        init = tokenizer(cfg.prompt_init, add_special_tokens=False).input_ids if tokenizer is not None else []
        if not init:
            raise EndlessError(f"--prompt-init {cfg.prompt_init!r} gives no tokens")
        prompt = FamPrompt.from_tokens(Transformer(peft_model.base_model.model), init, policy.fam)
    return FamModule(peft_model, prompt, policy)


def _resume(cfg: FamTrainConfig, hf_model, policy: FAM) -> FamModule:
    """The module of checkpoint ``cfg.init`` (its adapter trainable, its prompt) over ``hf_model``,
    which must be the base model it was trained on; ``cfg.policy`` must be its policy."""
    from peft import PeftModel

    from endless.fam.checkpoint import ADAPTER, load_prompt, read_meta
    from endless.models import model_identity

    path = Path(cfg.init)
    meta = read_meta(path)
    saved = parse_policy(meta["policy"])
    if saved.spec != parse_policy(cfg.policy).spec:
        raise EndlessError(f"{path} was trained as {saved.spec}, not {cfg.policy}")
    if model_identity(hf_model) != meta["base_identity"]:
        raise EndlessError(f"{path} was trained on another base model than {cfg.model}")
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(hf_model, str(path / ADAPTER), is_trainable=True)
    except Exception as e:
        raise EndlessError(f"cannot apply the adapter in {path / ADAPTER}: {type(e).__name__}: {str(e)[:120]}") from None
    return FamModule(peft_model, load_prompt(path, policy, hf_model.config.hidden_size), policy)


class Sampler:
    """Training examples for one process: PassKey at random lengths and depths, or text."""

    def __init__(self, cfg: FamTrainConfig, tokenizer, rank: int) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed * 1000 + rank)  # each rank its own stream of data
        self.fmt = PasskeyFormat(tokenizer, filler=cfg.filler)
        lo = self.fmt.fixed_tokens(cfg.digits, cfg.queries) + 1
        if cfg.max_len < lo:
            raise EndlessError(f"--max-len must be at least {lo} tokens (the PassKey prompt without filler)")
        self.min_len = max(cfg.min_len, lo)
        self.block = parse_policy(cfg.policy).block
        # its own draws, so that the keys, depths and other lengths stay those of a run without --align
        self.align_rng = random.Random(f"align {cfg.seed} {rank}")
        self.text_tokens: list[int] | None = None
        if cfg.text_fraction > 0:
            from endless.data.texts import read_text

            text = read_text(cfg.text or "kjv")
            self.text_tokens = tokenizer(text[: 40 * cfg.max_len * 64], add_special_tokens=False).input_ids

    def _aligned(self, n: int, hi: int) -> int:
        """``n`` rounded down to a whole number of blocks, or up when that falls below ``min_len``;
        ``n`` itself when no such length lies in [min_len, ``hi``]."""
        for m in ((n // self.block) * self.block, -(-n // self.block) * self.block):
            if self.min_len <= m <= hi:
                return m
        return n

    def batch(self, max_len: int | None = None) -> list[Example]:
        """One step's examples, all of one length drawn in [min_len, ``max_len`` (default: the
        config's)]: equal lengths pad nothing."""
        cfg, rng = self.cfg, self.rng
        hi = max(self.min_len, max_len or cfg.max_len)
        n = rng.randint(self.min_len, hi)
        if cfg.align and self.align_rng.random() < cfg.align:
            n = self._aligned(n, hi)
        if self.text_tokens is not None and rng.random() < cfg.text_fraction:
            return [text_example(self.text_tokens, n, rng=rng) for _ in range(cfg.batch)]
        out = []
        for _ in range(cfg.batch):
            e = self.fmt.example(n, rng.random() * cfg.max_depth, random_key(rng, cfg.digits), cfg.queries)
            out.append(Example(e.prompt, e.answer, e.key, e.depth, answer_only=not cfg.all_tokens, spans=e.spans))
        return out


def _base_name(model: str) -> str:
    """What a checkpoint records to find its base model again: an embedded name, or an absolute path."""
    from endless.models import EMBEDDED

    return model if model.lower() in EMBEDDED else str(Path(model).expanduser().resolve())


def train(cfg: FamTrainConfig, *, out: "str | Path | None", cpu: bool | None = None,
          progress: bool = True, hf_model=None, tokenizer=None) -> FamTrainResult:
    """Fine-tune and (on rank 0) save a checkpoint at ``out``. ``hf_model``/``tokenizer``
    skip loading ``cfg.model`` (tests). Every process of a distributed launch calls this."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from endless.device import describe, resolve_device
    from endless.models import load, model_identity
    from endless.progress import bar as progress_bar

    if cpu is None:
        cpu = resolve_device(cfg.device).type == "cpu"
    # float32 unless bf16 autocast is asked for: with the same seed and data, bf16 autocast took
    # SmolLM2's FAM training back to chance (docs/experiments/fam-notebook.md 7.3)
    mixed = "no" if cfg.mixed_precision == "auto" else cfg.mixed_precision
    if not cpu and mixed == "no":
        # TF32 products on a GPU (float32 sums, outputs and FAM states) make float32 affordable
        # there; process-wide, as PyTorch's setting is
        torch.set_float32_matmul_precision("high")
    # steps from a passed, explored or held state skip the prompt: DDP must allow it
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.rsp > 0 or cfg.unexplored > 0 or cfg.grad_cap > 0)
    acc = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=[ddp])
    torch.manual_seed(cfg.seed)
    if hf_model is None:
        hf_model, tokenizer = load(cfg.model, dtype=cfg.dtype)
    hf_model.to(acc.device)  # before our forward path is built: its RoPE tables live there too
    if tokenizer is None:
        raise EndlessError(f"{cfg.model} has no tokenizer; training on PassKey text needs one")
    base_identity = model_identity(hf_model)
    module = build(cfg, hf_model, tokenizer)
    module.grad_checkpoint = cfg.grad_checkpoint
    module.train()
    lora_params = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("prompt.")]
    groups = [{"params": lora_params, "lr": cfg.lr}]
    if module.prompt is not None:
        groups.append({"params": [module.prompt.embeddings], "lr": cfg.prompt_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    peaks = [g["lr"] for g in groups]
    module, opt = acc.prepare(module, opt)
    sampler = Sampler(cfg, tokenizer, acc.process_index)
    rng = random.Random(cfg.seed * 7919 + acc.process_index)
    # the unexplored states draw apart, so the other draws stay those of a run without them
    ux_rng = random.Random(cfg.seed * 7919 + acc.process_index + 5)
    ux_gen = torch.Generator().manual_seed(cfg.seed * 7919 + acc.process_index + 5)
    inner = acc.unwrap_model(module)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    validator = None
    if cfg.val_every:
        examples = validation_examples(sampler.fmt, inner.policy, cfg.val_len or cfg.max_len, cfg.val_examples,
                                       cfg.digits)
        validator = Validator(examples, inner, acc, batch=cfg.batch)
        validator(0)  # the starting point, which may stay the best
    carried: list[torch.Tensor] | None = None  # RSP and unexplored states: final FAMs of the last step
    losses: list[float] = []
    curriculum = Stages(cfg.curriculum or (cfg.max_len,), threshold=cfg.curriculum_loss, window=cfg.log_every)
    start = time.perf_counter()
    elapsed = 0.0  # seconds of training, reduced over the ranks: every rank sets the same rates
    bar = progress_bar(range(cfg.steps), desc="train fam", disable=not (progress and acc.is_main_process), leave=True)
    for step in bar:
        factor = lr_factor(step, steps=cfg.steps, warmup=cfg.warmup, cosine=cfg.cosine, minutes=cfg.minutes,
                           elapsed=elapsed)
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * factor
        ids, targets = collate(sampler.batch(curriculum.length), pad=tokenizer.pad_token_id or 0)
        ids, targets = ids.to(acc.device), targets.to(acc.device)
        offset = rng.randrange(RPO_MAX) if cfg.rpo and rng.random() < 0.5 else 0
        init = fresh = None
        if carried is not None and step >= cfg.rsp_after and rng.random() < cfg.rsp:
            init = passed_state(carried, ids.shape[0], cfg.rsp_shuffle, rng)
        if init is None and carried is not None and cfg.unexplored > 0 and step >= cfg.unexplored_after:
            init, fresh = unexplored_start(inner.model, inner.prompt, carried, cfg.unexplored, cfg.unexplored_from,
                                           ux_rng, ux_gen)
        cut = graded_cut(ids.shape[1], cfg.grad_cap, inner.policy.block)
        if cut:  # truncated back-propagation: the hold's start is read without gradient
            if inner.prompt is not None:  # BSWA carries nothing over the cut, as in its stream
                init, fresh = inner.hold(ids[:, :cut], offset, init, fresh), None
            ids, targets, offset = ids[:, cut:], targets[:, cut:], offset + cut
        loss, state = module(ids, targets, offset, init, fresh)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (cfg.rsp > 0 or cfg.unexplored > 0) and state:
            carried = [s.detach() for s in state]
        mean = acc.reduce(loss.detach(), reduction="mean").item()
        losses.append(mean)
        if not math.isfinite(mean):  # the reduced loss: every process stops at the same step
            raise EndlessError(f"the loss is not finite at step {step + 1}: training diverged (try a lower --lr)")
        if (step + 1) % cfg.log_every == 0:
            recent = sum(losses[-cfg.log_every:]) / cfg.log_every
            bar.set_postfix(loss=f"{recent:.3f}", len=curriculum.length, refresh=False)
            log.info("step %d loss %.4f (max length %d)", step + 1, recent, curriculum.length)
        # every rank decides from the reduced loss and rank 0's clock: all stop (and advance) together
        elapsed = acc.reduce(torch.tensor(time.perf_counter() - start, device=acc.device), reduction="mean").item()
        budget = 60 * cfg.minutes if cfg.minutes is not None else None
        spent = elapsed >= budget * curriculum.share if budget else step + 1 >= cfg.steps * curriculum.share
        curriculum.record(step, mean, spent=spent)
        if validator is not None and (step + 1) % cfg.val_every == 0:
            validator(step + 1)
        if out is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and acc.is_main_process:
            _write(Path(f"{out}-step{step + 1}"), acc, module, cfg, base_identity, elapsed, step + 1, curriculum.began)
        if cfg.minutes is not None and elapsed >= 60 * cfg.minutes:
            log.info("time budget of %.1f min reached after %d steps", cfg.minutes, step + 1)
            break
    best = None
    if validator is not None:
        if validator.curve[-1]["step"] != len(losses):  # the final state competes too
            validator(len(losses))
        if cfg.keep_best:
            best = validator.keep_best()
    seconds = time.perf_counter() - start
    log.info("rank %d of %d: %d steps in %.1f s", acc.process_index, acc.num_processes, len(losses), seconds)
    acc.wait_for_everyone()
    path = None
    if out is not None:
        path = Path(out)
        if acc.is_main_process:
            kept = {"best_step": best, "val_loss": validator.best.loss} if best is not None else {}
            _write(path, acc, module, cfg, base_identity, seconds, len(losses), curriculum.began, kept)
        acc.wait_for_everyone()
    module = acc.unwrap_model(module)
    module.eval()
    return FamTrainResult(path, losses, seconds, acc.num_processes, acc.is_main_process, module, tokenizer,
                          stages=curriculum.began, device=describe(acc.device),
                          validation=validator.curve if validator is not None else [], best_step=best)


def _write(path: Path, acc: Accelerator, module: nn.Module, cfg: FamTrainConfig, base_identity: str, seconds: float,
           steps_done: int, stages: list, extra: dict | None = None) -> None:
    """Rank 0 writes the checkpoint of the run so far at ``path`` (``save_fam``: atomic, replaces one
    there); ``extra`` joins the recorded training config (the kept step of ``keep_best``)."""
    from endless.device import describe
    from endless.fam.checkpoint import save_fam

    inner = acc.unwrap_model(module)
    spec = inner.policy if inner.policy.fam else inner.policy.as_bswa()
    save_fam(path, inner.peft, inner.prompt, spec, base_model=_base_name(cfg.model), base_identity=base_identity,
             train_config={**asdict(cfg), "processes": acc.num_processes, "seconds": round(seconds, 1),
                           "steps_done": steps_done, "stages": list(stages), "device": describe(acc.device),
                           **(extra or {})})
    log.info("rank %d wrote the checkpoint %s", acc.process_index, path)


__all__ = ["FamTrainConfig", "FamTrainResult", "FamModule", "build", "train", "LORA_TARGETS"]
