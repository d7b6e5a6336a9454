"""The from-scratch PassKey experiment (docs/methods.md section 3, "A CPU-sized check").

A 2-layer, d=64, 4-head Llama is trained from random weights on 16-96-token digit PassKey
sequences (``endless.data.passkey.digit_example``) under each policy with the same budget (steps,
batch, learning rate, data), then evaluated far beyond the training length (64x: 6144 tokens)
with the streaming path. FAM has to carry the key through hundreds of memory updates; BSWA can
only see its receptive field, so it fails as soon as the key lies beyond it -- even a BSWA
whose window covered every training sequence.

Schedule (*ours*, docs/methods.md leaves it open): AdamW, linear warm-up then cosine decay, batch 128,
weights drawn with std 0.07. With a constant rate, std 0.02 and batch 32 FAM reached 0.30 exact
match at 96 tokens in the same steps; with this schedule it learns the training lengths exactly.
``rsp`` is the paper's random state passing; ``carry`` (*ours*, ``carried_batch``) puts the key
of some batches in a prefix read without gradient, so the graded part must hold a FAM that has
already been held for up to ``carry`` tokens; with ``carry_grad`` the prefix is back-propagated
through as well (the sequence is then simply longer, its key early). Three recipe options
(benchmarks/fam-passkey-tiny/results/tiny_recipe.md measures them): ``curriculum`` grows the carried length in stages
(``endless.train.curriculum.Stages``), ``grad_cap`` bounds the graded part of a carried prefix (the rest is read
without gradient), and ``unexplored`` starts sequences from explored FAM states
(``endless.train.states.unexplored_start``).

``ablations`` are the paper's negative results: static query, no FFN on the update,
stop-gradient between updates, and F in {1, 4, 16}. The static-query ablation is scored with the
parallel path (teacher forcing, equal to greedy decoding), since the streaming state does not
implement it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from endless.data.passkey import FIRST_FILLER, collate, digit_example
from endless.errors import EndlessError
from endless.eval.passkey import PasskeyResult, passkey_accuracy, summarize
from endless.fam import FamPrompt, parallel_forward
from endless.policies.spec import FAM, Policy, parse_policy
from endless.progress import bar as progress_bar
from endless.train import schedule
from endless.train.curriculum import Stages
from endless.train.states import unexplored_start
from endless.train.tiny_checkpoint import save_tiny
from endless.train.tiny_config import TinyConfig, TinyRun
from endless.transformer import Transformer

log = logging.getLogger(__name__)

def policies(cfg: TinyConfig, *, ablation: bool = False) -> list[str]:
    """FAM and BSWA at every M, a BSWA whose window covers the longest training sequence, and
    with ``ablation`` the paper's ablations at the first M."""
    b, f = cfg.block, cfg.fam
    specs = [s for m in cfg.memories for s in (f"fam:{b}x{m}+{f}", f"bswa:{b}x{m}")]
    specs.append(f"bswa:{b}x{-(-cfg.max_len // b)}")  # window >= every training sequence
    if ablation:
        m = cfg.memories[0]
        specs += [f"fam:{b}x{m}+{f},{flag}" for flag in ("static", "noffn", "detach")]
        specs += [f"fam:{b}x{m}+{n}" for n in (1, 4, 16) if n != f]
    return specs


def build_model(policy: Policy, cfg: TinyConfig, device: "str | torch.device | None" = None) -> Transformer:
    """A fresh random tiny Llama (seeded, built on the CPU, then moved to ``device``) with a FAM
    prompt when the policy has FAM rows."""
    from endless.models.tiny import tiny_model

    span = policy.span() or cfg.max_len
    hf = tiny_model("llama", seed=cfg.seed, vocab_size=cfg.vocab, max_position_embeddings=max(256, 2 * span),
                    initializer_range=cfg.init_std, num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn)
    if cfg.out_std is not None:  # the projections that write into the residual streams (and the FAM)
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.o_proj.weight.normal_(0.0, cfg.out_std)
                layer.mlp.down_proj.weight.normal_(0.0, cfg.out_std)
    hf.train()
    model = Transformer(hf, device=device)
    if isinstance(policy, FAM) and policy.fam:
        # *ours*: the prompt starts as embeddings of filler symbols (the tiny task has no words)
        model.fam_prompt = FamPrompt.from_tokens(model, list(range(FIRST_FILLER, FIRST_FILLER + policy.fam)), policy.fam)
    else:
        model.fam_prompt = None
    return model


def _depth(draw: float, cfg: TinyConfig) -> float:
    """The key's depth: the random draw, or the fixed ``key_depth`` (the draw is still made, so the
    rest of the data is the same either way)."""
    return draw if cfg.key_depth is None else cfg.key_depth


def lr_factor(step: int, cfg: TinyConfig, elapsed: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: ``cfg``'s warm-up, then constant or cosine to zero,
    following the clock too with ``cfg.minutes`` (``endless.train.schedule.lr_factor``)."""
    return schedule.lr_factor(step, steps=cfg.steps, warmup=cfg.warmup, cosine=cfg.cosine,
                              minutes=cfg.minutes, elapsed=elapsed)


def carried_batch(model: Transformer, policy: FAM, prompt, n: int, cfg: TinyConfig, rng: random.Random,
                  hold: int | None = None):
    """(ids, targets, state) of a batch whose key lies in a prefix read without gradient (*ours*).

    Each sequence is a digit PassKey of ``prefix + n`` tokens with its key inside the first
    ``prefix`` tokens (a random whole number of blocks, up to ``cfg.carry``). The prefix runs
    under ``no_grad``; the FAM it leaves (per layer (batch, F, d)) starts the graded rest, which
    is filler, the query and the answer. The only way to the key is the carried FAM: the step
    trains the update to *hold* a memory it has been holding for a long time, which sequences of
    16-96 tokens never ask for (truncated back-propagation through time over the FAM).
    With ``cfg.carry_grad`` it returns the whole sequences instead, (ids, targets, None): the
    prefix's updates are trained too (the no-gradient prefix never teaches them not to leak).
    ``hold`` replaces ``cfg.carry`` (a curriculum stage); with ``cfg.grad_cap`` a graded prefix longer
    than the cap is cut: its first ``prefix - grad_cap`` tokens run without gradient, as above, and
    their FAM starts the graded rest (truncated back-propagation through time, capped).
    """
    bl = policy.block
    prefix = rng.randrange(1, (hold or cfg.carry) // bl + 1) * bl
    total = prefix + n
    fill = total - cfg.digits - 2
    # depth so that KEY and its digits end inside the prefix
    batch = [digit_example(total, _depth(rng.random(), cfg) * (prefix - cfg.digits - 1) / fill, rng=rng, vocab=cfg.vocab,
                           digits=cfg.digits) for _ in range(cfg.batch)]
    ids, targets = collate(batch)
    if cfg.carry_grad:  # the hold is graded: gradients reach every update of the prefix (or the last grad_cap)
        if not cfg.grad_cap or prefix <= cfg.grad_cap:
            return ids, targets, None
        prefix -= cfg.grad_cap
    with torch.no_grad():
        _, state = parallel_forward(model, ids[:, :prefix], policy, prompt, return_state=True)
    return ids[:, prefix:], targets[:, prefix:], state


def train_policy(spec: str, cfg: TinyConfig, *, progress: bool = True, start: Transformer | None = None,
                 device: "str | torch.device | None" = None) -> TinyRun:
    """Train a fresh tiny model under ``spec`` with the shared budget; loss on the answer digits.
    ``start`` (a model trained under ``spec``, e.g. from ``load_tiny``) is trained further instead:
    a curriculum, with this budget's own warm-up and decay. ``device``: where it trains (the data
    is drawn on the host, the same on every device)."""
    policy = parse_policy(spec)
    model = start if start is not None else build_model(policy, cfg, device)
    if start is not None and device is not None:
        model.to(device)
    model.hf.train()
    prompt = model.fam_prompt
    params = list(model.hf.parameters()) + ([prompt.embeddings] if prompt is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 1)  # the same data for every policy
    losses: list[float] = []
    start = time.perf_counter()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, time.perf_counter() - start))
    bar = progress_bar(range(cfg.steps), desc=spec, disable=not progress)
    carried: list[torch.Tensor] | None = None  # RSP: the first example's final FAM, detached
    last: list[torch.Tensor] | None = None  # unexplored states: the last step's final FAMs, detached
    aux_rng = random.Random(cfg.seed + 3)  # RSP and carry draw apart from the plain batches
    # the unexplored states draw apart from both, so the other draws stay those of the baseline
    ux_rng, ux_gen = random.Random(cfg.seed + 5), torch.Generator().manual_seed(cfg.seed + 5)
    curriculum = Stages(cfg.curriculum or ((cfg.carry,) if cfg.carry else ()), threshold=cfg.curriculum_loss, window=50)
    for step in bar:
        n = rng.randint(cfg.min_len, cfg.max_len) - cfg.digits
        init = fresh = None
        hold = curriculum.length
        is_carried = prompt is not None and hold and step >= cfg.carry_after and aux_rng.random() < cfg.carry_p
        if is_carried:
            ids, targets, init = carried_batch(model, policy, prompt, n, cfg, aux_rng, hold=hold)
        else:
            batch = [digit_example(n, _depth(rng.random(), cfg), rng=rng, vocab=cfg.vocab, digits=cfg.digits)
                     for _ in range(cfg.batch)]
            ids, targets = collate(batch)
        rsp_on = prompt is not None and cfg.rsp > 0 and step >= cfg.rsp_after
        if rsp_on and init is None and carried is not None and aux_rng.random() < cfg.rsp:
            init = [s.expand(ids.shape[0], -1, -1) for s in carried]
        ux_on = prompt is not None and cfg.unexplored > 0
        if ux_on and init is None and last is not None and step >= cfg.unexplored_after:
            init, fresh = unexplored_start(model, prompt, last, cfg.unexplored, cfg.unexplored_from, ux_rng, ux_gen)
        if rsp_on or ux_on:  # the final FAM costs one more update: only computed when carried on
            logits, state = parallel_forward(model, ids, policy, prompt, init_state=init, return_state=True, fresh=fresh)
            carried = [s[:1].detach() for s in state]
            last = [s.detach() for s in state]
        else:
            logits = parallel_forward(model, ids, policy, prompt, init_state=init)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.to(logits.device).flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if is_carried:
            curriculum.record(step, losses[-1])
        if not math.isfinite(losses[-1]):  # stop now, not after the remaining steps
            raise EndlessError(f"{spec}: the loss is not finite at step {step + 1}: training diverged "
                               "(a lower --lr, or ',norm' to bound the FAM)")
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}", refresh=False)
        if cfg.minutes is not None and time.perf_counter() - start >= 60 * cfg.minutes:
            log.info("%s: time budget of %.1f min reached after %d steps", spec, cfg.minutes, step + 1)
            break
    model.hf.eval()
    seconds = time.perf_counter() - start
    log.info("%s: %d steps in %.0f s, final loss %.3f", spec, len(losses), seconds, sum(losses[-50:]) / min(50, len(losses)))
    return TinyRun(spec, model, losses, seconds, stages=curriculum.began if cfg.curriculum else [])


def evaluate(run: TinyRun, cfg: TinyConfig, *, progress: bool = True) -> list[PasskeyResult]:
    """Exact-match accuracy at every evaluation length (streaming; parallel for a static query)."""
    policy = parse_policy(run.policy)
    method = "parallel" if isinstance(policy, FAM) and policy.static_query else "stream"
    rng = random.Random(cfg.seed + 2)  # the same test set for every policy
    examples = [
        digit_example(n, _depth(rng.random(), cfg), rng=rng, vocab=cfg.vocab, digits=cfg.digits)
        for n in cfg.eval_lengths
        for _ in range(cfg.eval_examples)
    ]
    with progress_bar(total=len(examples), desc=f"eval {run.policy}", disable=not progress) as bar:
        correct = passkey_accuracy(run.model, policy, examples, batch=cfg.eval_examples, method=method, progress=bar.update)
    run.results = summarize(run.policy, examples, correct)
    return run.results


def diagnose(run: TinyRun, cfg: TinyConfig, length: int, *, examples: int = 64) -> dict:
    """Where a FAM run's memory goes (``endless.fam.diagnose``) on ``length``-token prompts with
    the key in the first block; the reference stream has the longest training length."""
    from endless.fam.diagnose import memory_report

    rng = random.Random(cfg.seed + 4)
    batch = [digit_example(length, 0.0, rng=rng, vocab=cfg.vocab, digits=cfg.digits) for _ in range(examples)]
    short = cfg.max_len // cfg.block * cfg.block
    return memory_report(run.model, parse_policy(run.policy), batch, short=short, trained_updates=short // cfg.block)


def save_name(spec: str) -> str:
    """The folder ``--save`` gives a policy's model: its spec with ':' and ',' made path-safe."""
    return spec.replace(":", "-").replace(",", "_")


def run_experiment(cfg: TinyConfig, *, ablation: bool = False, only: list[str] | None = None,
                   progress: bool = True, save: "Path | None" = None, start: TinyRun | None = None,
                   device: "str | torch.device | None" = None) -> list[TinyRun]:
    """Train and evaluate every policy of the experiment (or ``only`` these specs). ``save``: a
    folder that receives each trained model (``save / save_name(spec)``) before it is evaluated;
    ``start``: continue training that saved run instead (its policy only)."""
    torch.manual_seed(cfg.seed)
    runs = []
    specs = [start.policy] if start is not None else only or policies(cfg, ablation=ablation)
    for spec in specs:
        run = train_policy(spec, cfg, progress=progress, start=start.model if start is not None else None,
                           device=device)
        if save is not None:
            log.info("%s: saved to %s", spec, save_tiny(save / save_name(spec), run, cfg))
        evaluate(run, cfg, progress=progress)
        runs.append(run)
    return runs


def config_dict(cfg: TinyConfig) -> dict:
    return asdict(cfg)


__all__ = ["TinyConfig", "TinyRun", "policies", "build_model", "train_policy", "evaluate", "diagnose", "run_experiment", "save_name"]
