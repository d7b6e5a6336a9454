"""Pre-training with a sink: vanilla vs zero sink vs a learnable sink token (issue 23).

"Efficient Streaming Language Models with Attention Sinks", section 3.3 pre-trains the same model
from scratch three ways and streams each: a vanilla softmax needs about four initial tokens as
sinks; a "zero sink" (SoftMax-off-by-One, ``endless.zero_sink``) fewer; and one learnable sink
token placed at the start of every training sample lets the model stream with that token as its
only sink. This is that experiment at CPU scale.

Contract: ``train(cfg)`` trains a small Llama (``SinkConfig``: d=192, 4 layers by default) from
random weights on the embedded King James Bible and Shakespeare (``endless.data.texts``), bytes
as tokens (transformers' ``ByT5Tokenizer``, one reserved id ``<extra_id_0>`` as the sink token),
and returns a ``SinkRun`` (model, tokenizer, loss curve, held-out loss). The three variants share
everything -- initial weights, data order, schedule, seed -- except:

- ``vanilla``: softmax attention;
- ``zero-sink``: softmax-off-by-one; config.json records ``endless_zero_sink: true`` so every
  loader and our streaming path attend the same way;
- ``learnable-sink``: the sink token is prepended to every sample (``with_sink``); it is not
  scored, so the three losses are over the same targets. config.json records its id as
  ``endless_sink_token``; evaluation prepends it too (``endless eval sinks --prefix-token ID``).

Data: samples are ``length`` consecutive bytes at uniformly drawn offsets of the first 95 % of
each text (``endless.data.texts.split_heldout``); the last 5 % (``kjv-heldout``,
``shakespeare-heldout``) is never trained on. Schedule (*ours*): AdamW (0.9, 0.95), weight decay
0.1, linear warm-up then cosine decay to a tenth, gradient norm clipped at 1.

``save(run, folder)`` writes a plain transformers folder (config, safetensors weights, tokenizer)
that ``endless.load(folder)`` and so every command's ``--model`` reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from endless.errors import EndlessError
from endless.train.schedule import lr_factor

VARIANTS = ("vanilla", "zero-sink", "learnable-sink")
SINK_TOKEN_NAME = "<extra_id_0>"
BYTE_OFFSET = 3  # ByT5: ids 0, 1, 2 are pad, eos, unk; byte b is id b + 3
CORPORA = ("kjv", "shakespeare")


@dataclass
class SinkConfig:
    """Model, data and schedule of one variant (the three share all but ``variant``)."""

    variant: str = "vanilla"
    steps: int = 600
    batch: int = 16
    length: int = 256  # training length in text tokens (the learnable sink's token comes on top)
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.1
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    ffn: int = 512
    init_std: float = 0.02
    seed: int = 0
    minutes: float | None = None  # stop early after this many minutes (the schedule follows the steps)
    heldout_batches: int = 4  # batches of held-out windows scored after training

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise EndlessError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for name in ("steps", "batch", "length", "hidden", "layers", "heads", "ffn"):
            if getattr(self, name) < 1:
                raise EndlessError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.length < 2:
            raise EndlessError("--length must be >= 2")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise EndlessError(f"--hidden {self.hidden} must split into --heads {self.heads} heads of an even size")


@dataclass
class SinkRun:
    """A trained variant: the transformers model, its tokenizer, the loss per step, seconds."""

    config: SinkConfig
    model: torch.nn.Module
    tokenizer: object
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    heldout_loss: float | None = None

    @property
    def sink_token(self) -> int | None:
        return sink_token_id(self.tokenizer) if self.config.variant == "learnable-sink" else None


def make_tokenizer():
    """Bytes as tokens, plus one reserved id (``<extra_id_0>``, 259) for the learnable sink."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=1)


def sink_token_id(tokenizer) -> int:
    return int(tokenizer.convert_tokens_to_ids(SINK_TOKEN_NAME))


def build_model(cfg: SinkConfig, vocab: int) -> torch.nn.Module:
    """A seeded random Llama of ``cfg``'s shape: the same weights for every variant (the sink
    token's embedding row exists in all three; only the learnable-sink variant reads it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from endless.zero_sink import CONFIG_KEY, register

    zero = cfg.variant == "zero-sink"
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=cfg.length + 1,
        initializer_range=cfg.init_std, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )
    setattr(config, CONFIG_KEY, zero)
    if cfg.variant == "learnable-sink":
        config.endless_sink_token = vocab - 1
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=register() if zero else "sdpa",
                                            dtype=torch.float32)


def corpus_ids(name: str, part: str = "train") -> torch.Tensor:
    """Token ids (int64) of the training (first 95 %) or held-out (last 5 %) part of a corpus:
    UTF-8 bytes shifted by ``BYTE_OFFSET``, which is what ``ByT5Tokenizer`` gives without the
    Python loop over 4 MB (tests check the two agree)."""
    from endless.data.texts import read_text, split_heldout

    train, heldout = split_heldout(read_text(name))
    data = (train if part == "train" else heldout).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + BYTE_OFFSET


def sample_batch(texts: list[torch.Tensor], batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, length) windows at uniform offsets; a text is drawn in proportion to its length."""
    sizes = torch.tensor([t.numel() - length for t in texts], dtype=torch.float64)
    which = torch.multinomial(sizes / sizes.sum(), batch, replacement=True, generator=gen)
    rows = []
    for w in which.tolist():
        start = int(torch.randint(0, texts[w].numel() - length, (1,), generator=gen))
        rows.append(texts[w][start : start + length])
    return torch.stack(rows)


def with_sink(ids: torch.Tensor, sink: int | None) -> torch.Tensor:
    """``ids`` (B, T) with the sink token prepended to every row (unchanged for ``None``)."""
    if sink is None:
        return ids
    return torch.cat([ids.new_full((ids.shape[0], 1), sink), ids], dim=1)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, sink: int | None) -> torch.Tensor:
    """Mean next-token loss on tokens 1..T-1 of the text windows ``ids`` (B, T). With a sink the
    model reads [sink, ids] and the sink's own prediction (of token 0) is not scored, so every
    variant is scored on the same targets."""
    logits = model(with_sink(ids, sink)).logits
    if sink is not None:
        logits = logits[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def lr_at(step: int, cfg: SinkConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to lr/10 at ``steps``."""
    return cfg.lr * lr_factor(step, steps=cfg.steps, warmup=cfg.warmup, floor=0.1)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, cfg: SinkConfig, sink: int | None) -> float:
    """Mean loss over ``heldout_batches`` fixed batches of held-out windows (seed 1234)."""
    texts = [corpus_ids(n, "heldout") for n in CORPORA]
    gen = torch.Generator().manual_seed(1234)
    was = model.training
    model.eval()
    losses = [float(lm_loss(model, sample_batch(texts, cfg.batch, cfg.length, gen), sink))
              for _ in range(cfg.heldout_batches)]
    model.train(was)
    return sum(losses) / len(losses)


def train(cfg: SinkConfig, *, progress: bool = True, texts: list[torch.Tensor] | None = None) -> SinkRun:
    """Train one variant (see the module docstring); ``texts`` replaces the corpora (tests)."""
    from endless.progress import bar

    tok = make_tokenizer()
    model = build_model(cfg, len(tok))
    sink = sink_token_id(tok) if cfg.variant == "learnable-sink" else None
    if texts is None:
        texts = [corpus_ids(n) for n in CORPORA]
    gen = torch.Generator().manual_seed(cfg.seed)  # the same data order for every variant
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    run = SinkRun(cfg, model, tok)
    model.train()
    t0 = time.perf_counter()
    with bar(total=cfg.steps, desc=cfg.variant, unit="step", disable=not progress) as pbar:
        for step in range(cfg.steps):
            if cfg.minutes is not None and time.perf_counter() - t0 > 60 * cfg.minutes:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = lm_loss(model, sample_batch(texts, cfg.batch, cfg.length, gen), sink)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            run.losses.append(float(loss.detach()))
            pbar.update(1)
            pbar.set_postfix(loss=f"{sum(run.losses[-20:]) / len(run.losses[-20:]):.3f}")
    run.seconds = time.perf_counter() - t0
    model.eval()
    return run


def save(run: SinkRun, folder: "str | Path") -> Path:
    """The model, tokenizer and ``sink_pretrain.json`` (config, loss curve) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    (folder / "sink_pretrain.json").write_text(json.dumps(summary(run), indent=1) + "\n")
    return folder


def summary(run: SinkRun) -> dict:
    """JSON-ready record of a run: config, steps, seconds, loss curve, held-out loss, sink token."""
    return {"config": asdict(run.config), "steps": len(run.losses), "seconds": round(run.seconds, 1),
            "final_loss": sum(run.losses[-50:]) / max(1, len(run.losses[-50:])),
            "heldout_loss": run.heldout_loss, "sink_token": run.sink_token,
            "loss": [round(x, 4) for x in run.losses]}


__all__ = ["SinkConfig", "SinkRun", "VARIANTS", "build_model", "corpus_ids", "heldout_loss", "lm_loss",
           "make_tokenizer", "sample_batch", "save", "sink_token_id", "summary", "train", "with_sink"]
