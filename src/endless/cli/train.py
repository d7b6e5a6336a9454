"""``endless train fam`` and ``endless train fam-tiny`` (docs/methods.md section 3).

``fam`` fine-tunes a model (default: the embedded SmolLM2) with LoRA plus the FAM prompt and
saves a checkpoint that ``--fam CHECKPOINT`` loads; it runs unchanged on several processes
(``torchrun --nproc_per_node N -m endless.cli.main train fam ...`` on CPU, ``accelerate launch``
on GPUs). ``fam-tiny`` is the from-scratch experiment: FAM against BSWA with the same budget,
evaluated far beyond the training length. Both show progress, print a table and write
``--json PATH`` with ``{"results": [{"policy", "length", "accuracy", ...}], ...}`` and the loss curves.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from endless.cli.common import add_device_arg, add_model_args, device_from_args, resolve_dtype, write_json
from endless.errors import EndlessError
from endless.validate import BIG, THREADS, Rule, int_range, number_list

EVAL_EXAMPLES = Rule("eval_examples", int, 1, BIG)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train TransformerFAM (LoRA fine-tuning, or the tiny from-scratch experiment)",
                       description="Train TransformerFAM: `fam` fine-tunes a model, `fam-tiny` runs the from-scratch PassKey experiment.")
    tsub = p.add_subparsers(dest="train_command", metavar="WHAT")
    _add_fam(tsub)
    _add_tiny(tsub)
    _add_sink(tsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_fam(tsub) -> None:
    from endless.train.fam import RULES, FamTrainConfig

    d = FamTrainConfig()
    p = tsub.add_parser(
        "fam", help="fine-tune a model for FAM with LoRA on PassKey data; saves a checkpoint",
        description=(
            "Fine-tune a model with LoRA (attention and FFN projections) plus the F learned FAM prompt "
            "embeddings, through the exact parallel FAM schedule, on PassKey examples in the paper's format "
            "(optionally mixed with plain text). Loss on the answer tokens, constant learning rate unless "
            "--warmup or --cosine. Writes a checkpoint folder (adapter, prompt, config) for `--fam CHECKPOINT`. "
            "A bswa:BxM policy trains the BSWA baseline with the same budget. Several processes: `torchrun --nproc_per_node 2 -m "
            "endless.cli.main train fam ...` on CPU (each process takes its own data, gradients are "
            "all-reduced, rank 0 writes), `accelerate launch` on GPUs."
        ),
    )
    add_model_args(p, fam=False)
    p.add_argument("--out", type=Path, required=True, metavar="CHECKPOINT", help="checkpoint folder to write")
    p.add_argument("--policy", default=d.policy, help="fam:BxM+F (or bswa:BxM for the baseline) (default: %(default)s)")
    p.add_argument("--steps", type=RULES["steps"].arg, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=RULES["batch"].arg, default=d.batch, help="examples per step per process (default: %(default)s)")
    p.add_argument("--lr", type=RULES["lr"].arg, default=d.lr, help="LoRA learning rate (the peak with --warmup/--cosine) (default: %(default)s)")
    p.add_argument("--prompt-lr", type=RULES["prompt_lr"].arg, default=d.prompt_lr, help="FAM prompt learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=RULES["warmup"].arg, default=d.warmup, metavar="STEPS",
                   help="raise both rates linearly to --lr and --prompt-lr over the first STEPS steps (default: %(default)s)")
    p.add_argument("--cosine", action="store_true",
                   help="cosine decay of both rates to zero at the end of the budget: --steps, or --minutes when "
                        "the clock ends first (default: constant, as the paper)")
    p.add_argument("--lora-rank", type=RULES["lora_rank"].arg, default=d.lora_rank, help="(default: %(default)s)")
    p.add_argument("--lora-alpha", type=RULES["lora_alpha"].arg, default=d.lora_alpha, help="(default: %(default)s)")
    p.add_argument("--min-len", type=RULES["min_len"].arg, default=d.min_len, help="shortest PassKey prompt in tokens (default: %(default)s)")
    p.add_argument("--max-len", type=RULES["max_len"].arg, default=d.max_len, help="longest PassKey prompt in tokens (default: %(default)s)")
    p.add_argument("--digits", type=RULES["digits"].arg, default=d.digits, help="digits of the pass key (default: %(default)s)")
    p.add_argument("--max-depth", type=RULES["max_depth"].arg, default=d.max_depth, metavar="D",
                   help="the key's depth is drawn uniformly in [0, D]; below 1 more keys sit outside the "
                        "window, where only the memory can answer (from the start it learns slower: the keys "
                        "inside the window teach the answer first, docs/experiments/fam-notebook.md 7.3) (default: %(default)s)")
    p.add_argument("--queries", type=RULES["queries"].arg, default=d.queries, metavar="K",
                   help="ours: K questions per PassKey example, the first K-1 answered at even intervals after "
                        "the key, every answer graded: K gradings of the memory per sequence instead of one "
                        "(default: %(default)s, the paper's format)")
    p.add_argument("--align", type=RULES["align"].arg, default=d.align, metavar="P",
                   help="ours: with probability P a step's prompt length is a whole number of blocks, so the "
                        "answer opens a new block, as in `eval passkey` at such lengths (with M = 0 its digits "
                        "then see only the memory); uniform lengths do that for ~digits/B of the steps (default: %(default)s)")
    p.add_argument("--text", default=None, help="plain text to mix in: kjv, shakespeare or a file (default: kjv when --text-fraction > 0)")
    p.add_argument("--text-fraction", type=RULES["text_fraction"].arg, default=0.0, help="share of steps on plain text, loss on every token")
    p.add_argument("--all-tokens", action="store_true", help="loss on every PassKey token, not only the answer")
    p.add_argument("--rpo", action="store_true", help="random position offset (docs/methods.md; off by default)")
    p.add_argument("--rsp", type=RULES["rsp"].arg, default=0.0, metavar="P",
                   help="random state passing: start a step from the last step's final FAM with probability P (paper: 0.8; off by default)")
    p.add_argument("--filler", default=None, metavar="FILE",
                   help="prose instead of the paper's repeated filler sentences: a text file, or kjv / shakespeare")
    p.add_argument("--rsp-shuffle", action="store_true",
                   help="with --rsp: each sequence starts from the final FAM of a random sequence of the last "
                        "step (default: all from the first sequence's, the paper's)")
    p.add_argument("--rsp-after", type=RULES["rsp_after"].arg, default=d.rsp_after, metavar="STEP",
                   help="first step of --rsp (the paper's state passing after a warm-up) (default: %(default)s)")
    _add_unexplored(p, RULES, d)
    p.add_argument("--grad-cap", type=RULES["grad_cap"].arg, default=d.grad_cap, metavar="N",
                   help="back-propagate through at most the last N tokens of a sequence: its start runs without "
                        "gradient and hands its FAM on (truncated back-propagation over long holds, so --curriculum "
                        "can reach lengths a backward pass cannot); a whole number of blocks (default: 0, all)")
    p.add_argument("--minutes", type=RULES["minutes"].arg, default=None, metavar="M",
                   help="stop training after M minutes (the checkpoint is written all the same; set --steps high)")
    p.add_argument("--save-every", type=RULES["save_every"].arg, default=d.save_every, metavar="N",
                   help="also write the checkpoint every N steps, to CHECKPOINT-stepN (read a run's progress, "
                        "or keep what a run had before it diverged) (default: 0, only at the end)")
    p.add_argument("--val-every", type=RULES["val_every"].arg, default=d.val_every, metavar="N",
                   help="held-out PassKey answer loss with every key outside the window (read from the memory or "
                        "not at all), before the first step, every N steps and after the last (default: 0, off)")
    p.add_argument("--val-examples", type=RULES["val_examples"].arg, default=d.val_examples, metavar="K",
                   help="validation prompts, keys from a seed of their own (default: %(default)s)")
    p.add_argument("--val-len", type=RULES["val_len"].arg, default=d.val_len, metavar="N",
                   help="tokens of each validation prompt (default: --max-len)")
    p.add_argument("--keep-best", action="store_true",
                   help="the checkpoint holds the state at the lowest validation loss, not the last (needs --val-every)")
    p.add_argument("--curriculum", type=number_list(int, what="curriculum lengths"), default=(), metavar="N,N",
                   help="longest training sequence of each stage, ascending (RMT's curriculum over the number "
                        "of memory updates); a stage ends at its share of --steps/--minutes or once learned "
                        "(--curriculum-loss)")
    p.add_argument("--curriculum-loss", type=RULES["curriculum_loss"].arg, default=0.0, metavar="X",
                   help="end a curriculum stage early once the recent answer loss is below X nats (default: off)")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                   help="bf16: bf16 autocast over float32 weights (it destabilised FAM training on SmolLM2); "
                        "auto and no: float32, with TF32 products on CUDA (default: %(default)s)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each layer in the backward pass: activation memory of one layer (long sequences)")
    p.add_argument("--prompt-init", default=d.prompt_init, help="text whose token embeddings initialise the prompt (default: %(default)r)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="train a checkpoint of `endless train fam` further with this command's budget and data "
                        "(its policy, LoRA rank and alpha, prompt and base model; --out may be another folder)")
    p.add_argument("--seed", type=RULES["seed"].arg, default=0)
    p.add_argument("--eval-lengths", type=number_list(int, what="lengths"), default=None, metavar="N,N",
                   help="after training, PassKey accuracy at these prompt lengths (default: --max-len)")
    p.add_argument("--eval-examples", type=EVAL_EXAMPLES.arg, default=10, help="examples per evaluation length (default: %(default)s)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training (`eval passkey` does it)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results and the loss curve as JSON")
    p.set_defaults(func=run_fam)


def _add_unexplored(p, rules, d) -> None:
    """The unexplored-states flags (``endless.train.states.unexplored_start``), the same for
    ``train fam`` and ``train fam-tiny``."""
    p.add_argument("--unexplored", type=rules["unexplored"].arg, default=d.unexplored, metavar="P",
                   help="unexplored states (Buitrago Ruiz and Gu 2025): each sequence starts with probability P "
                        "from an explored FAM instead of the learned one (default: %(default)s, off)")
    p.add_argument("--unexplored-after", type=rules["unexplored_after"].arg, default=d.unexplored_after, metavar="STEP",
                   help="first step of --unexplored (default: %(default)s)")
    p.add_argument("--unexplored-from", default=d.unexplored_from, metavar="SOURCE",
                   help="batch: the last step's final FAMs, permuted (they chain over steps; with one sequence per "
                        "step, its own); noise: Gaussian rows with their mean and std (default: %(default)s)")


def _add_tiny(tsub) -> None:
    from endless.train.tiny_config import RULES, TinyConfig

    d = TinyConfig()
    p = tsub.add_parser(
        "fam-tiny", help="the from-scratch PassKey experiment: FAM vs BSWA, same budget, minutes on one core",
        description=(
            "Train a 2-layer d=64 Llama from scratch on 16-96-token digit PassKey sequences under FAM and BSWA "
            "with the same budget, then measure exact-match accuracy far beyond the training length with the "
            "streaming path. --ablation adds the paper's ablations (static query, no FFN on the update, "
            "stop-gradient between updates, F in {1, 4, 16})."
        ),
    )
    p.add_argument("--steps", type=RULES["steps"].arg, default=d.steps, help="(default: %(default)s)")
    p.add_argument("--minutes", type=RULES["minutes"].arg, default=None, metavar="M",
                   help="stop each policy's training after M minutes; the cosine decay follows the clock "
                        "when it ends before --steps")
    p.add_argument("--batch", type=RULES["batch"].arg, default=d.batch, help="(default: %(default)s)")
    p.add_argument("--lr", type=RULES["lr"].arg, default=d.lr, help="(default: %(default)s)")
    p.add_argument("--block", type=RULES["block"].arg, default=d.block, help="B (default: %(default)s)")
    p.add_argument("--fam", type=RULES["fam"].arg, default=d.fam, help="F (default: %(default)s)")
    p.add_argument("--kv-heads", type=RULES["kv_heads"].arg, default=d.kv_heads, choices=(1, 2, 4), help="key/value heads of 4 (default: %(default)s)")
    p.add_argument("--ffn", type=RULES["ffn"].arg, default=d.ffn, help="MLP width (default: %(default)s)")
    p.add_argument("--vocab", type=RULES["vocab"].arg, default=d.vocab, help="10 digits, 2 markers, the rest filler symbols (default: %(default)s)")
    p.add_argument("--min-len", type=RULES["min_len"].arg, default=d.min_len, help="shortest training sequence (default: %(default)s)")
    p.add_argument("--max-len", type=RULES["max_len"].arg, default=d.max_len, help="longest training sequence (default: %(default)s)")
    p.add_argument("--init-std", type=RULES["init_std"].arg, default=d.init_std, help="std of the random weights (default: %(default)s)")
    p.add_argument("--out-std", type=RULES["out_std"].arg, default=None,
                   help="std of the o_proj/down_proj weights, which write into the residual streams (default: --init-std)")
    p.add_argument("--constant-lr", action="store_true", help="no warm-up and cosine decay (the lr stays at --lr)")
    p.add_argument("--rsp", type=RULES["rsp"].arg, default=d.rsp, metavar="P",
                   help="random state passing with probability P (docs/methods.md; off by default)")
    p.add_argument("--rsp-after", type=RULES["rsp_after"].arg, default=d.rsp_after, metavar="STEP", help="first step of RSP (default: %(default)s)")
    p.add_argument("--carry", type=RULES["carry"].arg, default=d.carry, metavar="N",
                   help="ours: with probability --carry-p a batch's key lies in a prefix of up to N tokens read "
                        "without gradient (with --carry-grad: with), so the FAM must hold it (default: %(default)s, off)")
    p.add_argument("--carry-grad", action="store_true",
                   help="back-propagate through the carried prefix too: the whole hold is trained (slower)")
    p.add_argument("--carry-p", type=RULES["carry_p"].arg, default=d.carry_p, metavar="P", help="(default: %(default)s)")
    p.add_argument("--carry-after", type=RULES["carry_after"].arg, default=d.carry_after, metavar="STEP",
                   help="first step of --carry (default: %(default)s)")
    p.add_argument("--grad-cap", type=RULES["grad_cap"].arg, default=d.grad_cap, metavar="N",
                   help="with --carry-grad: back-propagate through at most the last N tokens of a carried prefix, "
                        "the rest is read without gradient (a multiple of the block; default: %(default)s, no cap)")
    p.add_argument("--curriculum", type=number_list(int, what="carry lengths"), default=(), metavar="N,N",
                   help="instead of --carry: carry lengths grown in stages (RMT's curriculum), the next once the "
                        "carried batches' mean loss over 50 steps is below --curriculum-loss (off by default)")
    p.add_argument("--curriculum-loss", type=RULES["curriculum_loss"].arg, default=d.curriculum_loss, metavar="L", help="(default: %(default)s)")
    _add_unexplored(p, RULES, d)
    p.add_argument("--key-depth", type=RULES["key_depth"].arg, default=None, metavar="D",
                   help="put the key at depth D in [0, 1] of every training and test prompt (0: the first tokens, "
                        "the paper's PassKey layout; default: uniform at random)")
    p.add_argument("--diagnose", type=int_range("--diagnose", 0, BIG), default=0, metavar="N",
                   help="after training, report per layer where each FAM's memory goes on N-token prompts "
                        "with the key in the first block (attention share of the update on the block; "
                        "exact match with one layer's FAM put back from a training-length stream)")
    p.add_argument("--memories", type=number_list(int, low=0, high=64, what="memory sizes M"), default=d.memories, help="values of M (default: 0,1)")
    p.add_argument("--policies", default=None, help="specs separated by ';' to run instead of the default set (a spec may hold commas: 'fam:8x1+4,norm')")
    p.add_argument("--ablation", action="store_true", help="add the paper's ablations")
    p.add_argument("--eval-lengths", type=number_list(int, what="lengths"), default=d.eval_lengths, help="(default: 96,384,6144)")
    p.add_argument("--eval-examples", type=RULES["eval_examples"].arg, default=d.eval_examples, help="examples per length (default: %(default)s)")
    p.add_argument("--seed", type=RULES["seed"].arg, default=d.seed)
    p.add_argument("--threads", type=THREADS.arg, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--save", type=Path, default=None, metavar="DIR",
                   help="write each trained model to DIR/SPEC (':' and ',' as '-' and '_', e.g. DIR/fam-8x1+4) "
                        "before it is evaluated, for --load and --init")
    p.add_argument("--load", type=Path, default=None, metavar="MODEL",
                   help="evaluate a model folder written by --save instead of training (its policy and data "
                        "settings; --eval-lengths, --eval-examples, --diagnose and --threads apply)")
    p.add_argument("--init", type=Path, default=None, metavar="MODEL",
                   help="train a model folder written by --save further with this command's budget "
                        "(its policy, shape and data alphabet; a curriculum)")
    add_device_arg(p)
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="accuracy against length")
    p.set_defaults(func=run_tiny)


def _add_sink(tsub) -> None:
    from endless.train.sink_pretrain import VARIANTS, SinkConfig

    d = SinkConfig()
    p = tsub.add_parser(
        "sink-pretrain", help="pre-train a small byte-level Llama: vanilla, zero sink or a learnable sink token",
        description=(
            "StreamingLLM section 3.3 at CPU scale: train a small Llama from scratch on the King James Bible and "
            "Shakespeare (bytes as tokens; the last 5 %% of each, kjv-heldout and shakespeare-heldout, is never "
            "trained on) as one of three variants with the same data, steps, schedule and seed: vanilla softmax, "
            "zero sink (softmax-off-by-one, recorded as endless_zero_sink in config.json) or a learnable sink "
            "token prepended to every sample (its id recorded as endless_sink_token; stream it with "
            "`endless eval sinks --prefix-token ID`). --save writes a transformers folder for --model."
        ),
    )
    p.add_argument("--variant", choices=VARIANTS, required=True)
    for name, help_ in (("steps", "optimizer steps"), ("batch", "windows per step"), ("length", "training length in tokens"),
                        ("warmup", "warm-up steps"), ("hidden", "model width"), ("layers", "layers"),
                        ("heads", "attention heads"), ("ffn", "MLP width"), ("seed", "weights and data order")):
        p.add_argument(f"--{name}", type=int_range(f"--{name}", 0 if name == "seed" else 1, BIG), default=getattr(d, name),
                       help=f"{help_} (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, cosine decay to a tenth (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=None, metavar="M", help="stop after M minutes (the schedule follows --steps)")
    p.add_argument("--threads", type=THREADS.arg, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--save", type=Path, default=None, metavar="DIR", help="write the model, tokenizer and loss curve to DIR")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="config, loss curve and held-out loss as JSON")
    p.set_defaults(func=run_sink)


def run_sink(args: argparse.Namespace) -> int:
    from endless.train.sink_pretrain import SinkConfig, heldout_loss, save, summary, train

    _threads(args)
    cfg = SinkConfig(variant=args.variant, steps=args.steps, batch=args.batch, length=args.length, lr=args.lr,
                     warmup=args.warmup, hidden=args.hidden, layers=args.layers, heads=args.heads, ffn=args.ffn,
                     seed=args.seed, minutes=args.minutes)
    run = train(cfg)
    run.heldout_loss = heldout_loss(run.model, cfg, run.sink_token)
    tail = run.losses[-50:]
    print(f"{cfg.variant}: {len(run.losses)} steps in {run.seconds:.0f} s, final training loss "
          f"{sum(tail) / len(tail):.4f}, held-out loss {run.heldout_loss:.4f} nats/byte"
          + (f", sink token {run.sink_token}" if run.sink_token is not None else ""))
    if args.save:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        print(f"saved to {save(run, args.save)}")
    if args.json:
        write_json(args.json, summary(run))
    return 0


def _threads(args) -> None:
    """--threads, else the cores shared among this machine's processes of a distributed launch."""
    import torch

    n = getattr(args, "threads", None)
    if not n:
        n = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n)


def run_tiny(args: argparse.Namespace) -> int:
    from endless.eval.passkey import plot, table
    from endless.train.tiny import TinyConfig, config_dict, run_experiment

    _threads(args)
    device = device_from_args(args)
    cfg = TinyConfig(  # validates itself
                     steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr, block=args.block, fam=args.fam,
                     kv_heads=args.kv_heads, ffn=args.ffn, vocab=args.vocab, min_len=args.min_len, max_len=args.max_len,
                     init_std=args.init_std, out_std=args.out_std,
                     memories=args.memories, eval_lengths=args.eval_lengths, eval_examples=args.eval_examples,
                     seed=args.seed, rsp=args.rsp, rsp_after=args.rsp_after,
                     carry=args.carry, carry_p=args.carry_p, carry_after=args.carry_after, carry_grad=args.carry_grad,
                     key_depth=args.key_depth, grad_cap=args.grad_cap, curriculum=tuple(args.curriculum),
                     curriculum_loss=args.curriculum_loss, unexplored=args.unexplored,
                     unexplored_after=args.unexplored_after, unexplored_from=args.unexplored_from,
                     **({"warmup": 0, "cosine": False} if args.constant_lr else {}))
    if args.diagnose and args.diagnose < cfg.max_len + 3 * cfg.block:
        raise EndlessError(f"--diagnose must be at least {cfg.max_len + 3 * cfg.block} tokens (the longest "
                           "training sequence plus three blocks)")
    only = [s.strip() for s in args.policies.split(";") if s.strip()] if args.policies else None
    if only:
        from endless.policies.spec import parse_policy

        for s in only:
            parse_policy(s)
    if args.save:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's shard bar between the training and evaluation bars
    saved = _saved_tiny(args)
    if saved is not None:
        run, trained = saved
        # the model's shape and data alphabet are the saved ones; budget and evaluation (with --seed the
        # test draws) are this command's
        shape = {k: getattr(trained, k) for k in ("vocab", "digits", "block", "fam", "kv_heads", "ffn", "init_std", "out_std")}
        cfg = replace(trained if args.load else cfg, **shape, eval_lengths=cfg.eval_lengths, eval_examples=cfg.eval_examples,
                      seed=cfg.seed)
    if args.load:
        from endless.train.tiny import evaluate

        run.model.to(device)
        evaluate(run, cfg)
        runs = [run]
    else:
        runs = run_experiment(cfg, ablation=args.ablation, only=only, progress=True, save=args.save,
                              start=saved[0] if saved is not None else None, device=device)
    results = [r for run in runs for r in run.results]
    print(table(results))
    print()
    memory = {}
    if args.diagnose:
        from endless.fam.diagnose import report_table
        from endless.policies.spec import FAM, parse_policy
        from endless.train.tiny import diagnose

        for run in runs:
            policy = parse_policy(run.policy)
            if isinstance(policy, FAM) and policy.fam and not policy.static_query:
                memory[run.policy] = diagnose(run, cfg, args.diagnose)
                print(f"{run.policy}: {report_table(memory[run.policy])}")
                print()
    for run in runs:
        tail = run.losses[-50:]
        what = f"loaded from {args.load}, trained" if args.load else "trained"
        print(f"{run.policy:24s} {what} {len(run.losses)} steps in {run.seconds:5.0f} s, final loss {sum(tail) / max(1, len(tail)):.3f}")
    if args.json:
        write_json(args.json, {
            "results": [r.as_dict() for r in results],
            "config": config_dict(cfg),
            "ablation": args.ablation,
            "runs": [{"policy": r.policy, "seconds": round(r.seconds, 1), "loss": [round(x, 4) for x in r.losses],
                      **({"curriculum": r.stages} if r.stages else {}),
                      **({"memory": memory[r.policy]} if r.policy in memory else {})} for r in runs],
        })
    if args.plot:
        longest = cfg.max_len + (min(cfg.longest_hold, cfg.grad_cap or cfg.longest_hold) if cfg.carry_grad else 0)  # a graded carried prefix lengthens the sequences
        plot(results, args.plot, title=f"PassKey, tiny from scratch: {cfg.steps} steps on {cfg.min_len}-{longest} tokens")
    return 0


def _saved_tiny(args: argparse.Namespace):
    """(run, its TinyConfig) of ``--load`` or ``--init``, or None; refuses flags that contradict them."""
    if args.load and args.init:
        raise EndlessError("--load evaluates a saved model and --init trains one further: give one of them")
    folder = args.load or args.init
    if folder is None:
        return None
    if args.policies or args.ablation:
        raise EndlessError("--load and --init take the policy from the saved model: drop --policies and --ablation")
    if args.load and args.save:
        raise EndlessError("--load trains nothing, so there is nothing to --save")
    from endless.train.tiny_checkpoint import load_tiny

    return load_tiny(folder)


def run_fam(args: argparse.Namespace) -> int:
    from endless.policies.spec import parse_policy
    from endless.train.fam import FamTrainConfig, train

    parse_policy(args.policy)  # a bad spec fails before the model loads
    if args.init:  # the checkpoint's shape wins: its policy, LoRA and base model
        from endless.fam.checkpoint import read_meta

        meta = read_meta(args.init)
        trained = meta.get("train", {})
        args.policy, args.model = meta["policy"], meta["base_model"]
        args.lora_rank = int(trained.get("lora_rank", args.lora_rank))
        args.lora_alpha = float(trained.get("lora_alpha", args.lora_alpha))
        args.dtype = str(trained.get("dtype", args.dtype))
    resolve_dtype(args)
    _threads(args)
    EVAL_EXAMPLES.check(args.eval_examples)  # a Namespace built by hand too
    cfg = FamTrainConfig(  # validates the rest
        model=args.model, policy=args.policy, steps=args.steps, batch=args.batch, lr=args.lr, prompt_lr=args.prompt_lr,
        warmup=args.warmup, cosine=args.cosine, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        min_len=args.min_len, max_len=args.max_len,
        digits=args.digits, max_depth=args.max_depth, queries=args.queries, align=args.align, text=args.text, text_fraction=args.text_fraction,
        all_tokens=args.all_tokens, rpo=args.rpo, rsp=args.rsp, prompt_init=args.prompt_init, init=args.init,
        dtype=args.dtype, seed=args.seed, device=args.device, mixed_precision=args.mixed_precision,
        grad_checkpoint=args.grad_checkpoint, minutes=args.minutes, save_every=args.save_every,
        val_every=args.val_every, val_examples=args.val_examples, val_len=args.val_len, keep_best=args.keep_best,
        curriculum=tuple(args.curriculum),
        curriculum_loss=args.curriculum_loss, rsp_shuffle=args.rsp_shuffle, filler=args.filler,
        rsp_after=args.rsp_after, grad_cap=args.grad_cap, unexplored=args.unexplored,
        unexplored_after=args.unexplored_after, unexplored_from=args.unexplored_from,
    )
    if args.filler:
        from endless.data.texts import read_text

        read_text(args.filler)  # a missing or empty file: one line before the model loads
    device_from_args(args)  # --device cuda without a GPU: one line before anything loads
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    res = train(cfg, out=args.out, progress=True)
    if not res.is_main:
        return 0  # rank 0 reports and evaluates
    results = []
    lengths = () if args.no_eval else args.eval_lengths or (cfg.max_len,)
    if lengths:
        results = _evaluate(res.module, res.tokenizer, cfg, lengths, args.eval_examples)
    tail = res.losses[-10:]
    print(f"trained {cfg.policy} for {len(res.losses)} steps on {res.processes} process(es) ({res.device}) "
          f"in {res.seconds:.0f} s; "
          f"final loss {sum(tail) / len(tail):.4f}; checkpoint {res.checkpoint}")
    if res.validation:
        low = min(res.validation, key=lambda v: v["loss"])
        kept = f"; the checkpoint holds step {res.best_step}" if res.best_step is not None else ""
        print(f"validation loss {res.validation[0]['loss']:.4f} at step 0, {res.validation[-1]['loss']:.4f} at step "
              f"{res.validation[-1]['step']}, lowest {low['loss']:.4f} at step {low['step']}{kept}")
    if results:
        from endless.eval.passkey import table

        print(table(results))
    if args.json:
        from dataclasses import asdict

        write_json(args.json, {
            "results": [r.as_dict() for r in results],
            "loss": [round(x, 5) for x in res.losses],
            "config": asdict(cfg),
            "processes": res.processes,
            "device": res.device,
            "steps_done": len(res.losses),
            "stages": res.stages,
            "validation": res.validation,
            "best_step": res.best_step,
            "seconds": round(res.seconds, 1),
            "checkpoint": str(res.checkpoint),
        })
    return 0


def _evaluate(module, tok, cfg, lengths, n: int):
    """PassKey accuracy (streaming) and answer loss (parallel schedule) of the freshly trained
    weights, keys at evenly spread depths."""
    import random

    from endless.data.passkey import PasskeyFormat, random_key
    from endless.eval.passkey import passkey_accuracy, passkey_answer_loss, summarize

    fmt = PasskeyFormat(tok)
    rng = random.Random(cfg.seed + 12345)
    depths = [(i + 0.5) / n for i in range(n)]
    examples = [fmt.example(length, dep, random_key(rng, cfg.digits)) for length in lengths for dep in depths]
    model = module.model
    model.fam_prompt = module.prompt
    correct = passkey_accuracy(model, module.policy, examples, tokenizer=tok, batch=max(1, min(n, 4)))
    losses = passkey_answer_loss(model, module.policy, examples, batch=max(1, min(n, 4)))
    spec = module.policy.spec if module.policy.fam else module.policy.as_bswa().spec
    return summarize(spec, examples, correct, losses=losses)
