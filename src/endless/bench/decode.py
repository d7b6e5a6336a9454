"""Per-token decode latency at a fixed cache length: our policies against transformers' own.

Each cell (one cache length L) sets up, on the same weights and the same token sequence:

- ``sinks``: ``Stream(model, "sinks:4+{L-4}")`` after a chunked prefill of L tokens, so every
  decoded token attends to L+1 keys, forever;
- ``dense``: our dense policy after L tokens (its buffer grows; L+1..L+n keys);
- ``recompute``: ``recompute:L``, the whole window of L+1 tokens re-run for every token
  (docs/methods.md section 1), the baseline of StreamingLLM's speed-up;
- ``transformers``: the Hugging Face model itself with its ``DynamicCache`` holding L tokens,
  called one token at a time under ``torch.inference_mode`` (what ``generate`` does per step);
  the cache is cropped back to L after every step so every step sees the same length.

All four are timed in interleaved steps (``timing.interleave``): ratios between them are
measured under the same machine load. Bytes read per token (weights + the keys/values a step
touches) turn times into GB/s, to compare with the copy bandwidth.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from endless.bench.timing import interleave, stats
from endless.stream import Stream
from endless.transformer import Transformer

log = logging.getLogger(__name__)


def weight_bytes(model: Transformer) -> int:
    """Bytes of the weights one decoded token reads: every decoder matrix and the LM head."""
    total = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    for layer in model.layers:
        total += sum(p.numel() * p.element_size() for p in layer.parameters())
    return total


def kv_bytes(model: Transformer, slots: int) -> int:
    """Bytes of keys and values over ``slots`` positions in every layer."""
    d = model.dims
    return 2 * d.n_layers * d.n_kv_heads * slots * d.head_dim * model.dtype.itemsize


class TokenFeed:
    """The next token of a fixed sequence, wrapping around (decoding never needs its own output)."""

    def __init__(self, ids: torch.Tensor, start: int) -> None:
        self.ids, self.i = ids, start

    def next(self) -> torch.Tensor:
        tok = self.ids[self.i % len(self.ids)].view(1, 1)
        self.i += 1
        return tok


class OursDecoder:
    """One of our streams, prefilled with ``length`` tokens, decoding one token per ``step``."""

    def __init__(self, model: Transformer, policy: str, ids: torch.Tensor, length: int, *, chunk: int = 128) -> None:
        self.stream = Stream(model, policy, chunk=chunk)
        self.stream.feed(ids[:length], logprobs=False)
        self.feed = TokenFeed(ids, length)
        self.model = model

    def step(self) -> None:
        self.stream.feed(self.feed.next(), logprobs=False)

    def kv_slots(self) -> int:
        """Key/value slots one step reads (the whole ring: sinks, window and chunk slack)."""
        state = self.stream.state
        return state.capacity if hasattr(state, "capacity") else 0

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stream.state.state_tensors().values())


class HFDecoder:
    """transformers' own decoding: the model's forward with a ``DynamicCache`` of ``length`` tokens."""

    def __init__(self, hf_model: torch.nn.Module, ids: torch.Tensor, length: int, *, chunk: int = 512) -> None:
        from transformers import DynamicCache

        self.hf = hf_model
        ids = ids.to(next(hf_model.parameters()).device)  # its forward takes ids where its weights are
        self.cache = DynamicCache(config=hf_model.config)
        with torch.inference_mode():
            for lo in range(0, length, chunk):  # chunked so a long prefill never builds an L x L score matrix
                hf_model(input_ids=ids[None, lo : min(length, lo + chunk)], past_key_values=self.cache, use_cache=True)
        self.feed = TokenFeed(ids, length)
        self.length = length

    @torch.inference_mode()
    def step(self) -> None:
        self.hf(input_ids=self.feed.next(), past_key_values=self.cache, use_cache=True)
        self.cache.crop(-1)  # back to ``length`` tokens: every step sees the same cache

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


def decode_cell(hf_model, model: Transformer, ids: torch.Tensor, length: int, *, rounds: int,
                recompute_steps: int, sinks: int = 4, with_hf: bool = True, with_dense: bool = True,
                extra: dict[str, Callable[[int], object]] | None = None, sync: Callable[[], object] | None = None) -> dict:
    """Interleaved per-token timings of every implementation at cache length ``length``.

    ``extra`` maps more names to factories ``length -> decoder`` (an object with ``step()`` and
    ``state_bytes()``), e.g. llama.cpp; they join the same interleaved rounds."""
    impls: dict[str, object] = {"sinks": OursDecoder(model, f"sinks:{sinks}+{length - sinks}", ids, length)}
    if with_dense:
        impls["dense"] = OursDecoder(model, "dense", ids, length)
    if with_hf:
        impls["transformers"] = HFDecoder(hf_model, ids, length)
    for name, make in (extra or {}).items():
        impls[name] = make(length)
    every = {}
    if recompute_steps > 0:
        impls["recompute"] = OursDecoder(model, f"recompute:{length}", ids, length)
        every["recompute"] = max(1, rounds // recompute_steps)
    times = interleave({name: impl.step for name, impl in impls.items()}, rounds, every=every, sync=sync)
    wbytes = weight_bytes(model)
    out = {"cache": length, "impls": {}}
    for name, impl in impls.items():
        st = stats(times[name])
        if hasattr(impl, "bytes_per_token"):
            read = impl.bytes_per_token()
        elif name == "recompute":  # a whole window through every layer: weights once, no cache
            read = wbytes
        elif isinstance(impl, OursDecoder):
            read = wbytes + kv_bytes(model, impl.kv_slots())
        else:  # transformers (and others holding the same weights): weights + L+1 keys/values
            read = wbytes + kv_bytes(model, length + 1)
        if hasattr(impl, "prefill_tokens_per_s"):
            st["prefill_tokens_per_s"] = impl.prefill_tokens_per_s
        st.update(
            tokens_per_s=1000 / st["median_ms"],
            bytes_per_token=read,
            gb_per_s=read / (st["median_ms"] / 1000) / 1e9,
            state_bytes=impl.state_bytes(),
        )
        out["impls"][name] = st
    med = {name: r["median_ms"] for name, r in out["impls"].items()}
    out["ratios"] = {f"{name}/sinks": med[name] / med["sinks"] for name in med if name != "sinks"}
    log.info("cache %d: %s", length, ", ".join(f"{n} {m:.1f} ms" for n, m in med.items()))
    del impls
    gc.collect()
    return out
