"""StreamingLLM for a stock transformers model: ``model.generate(ids, past_key_values=cache)``.

Contract (docs/methods.md section 2; docs/methods.md section 4, "the Cache API in ``hf.py``")::

    cache = endless.hf.streaming(model, "sinks:4+1020")     # Llama, Mistral, Qwen2, Qwen3
    out = model.generate(ids, past_key_values=cache, max_new_tokens=500)
    out = model.generate(torch.cat([out, next_turn], 1), past_key_values=cache, ...)

- Exactly the ``sinks:S+W`` policy of ``endless.stream.Stream`` (``endless.policies.spec.Sinks``): a token
  at stream index t attends to the first S tokens and to tokens t-W..t; window keys keep their
  true distance to the query, sink j sits at in-cache distance ``min(t, S+W) - j``. Greedy
  ``generate`` returns the tokens ``Stream(model, spec).feed(ids)`` then ``.generate(n)`` does,
  with logits within float32 rounding (tests/test_hf.py).
- That holds inside one forward call with many queries: a prompt far longer than the window
  goes straight to ``generate`` and every query sees exactly its own sinks and window.
- Constant memory: each layer's keys/values are one buffer of S + W + ``chunk`` slots allocated
  at the first forward and written in place forever after (decoding far beyond the model's
  ``max_position_embeddings`` included). It does not remember evicted tokens: StreamingLLM keeps
  streaming stable, it does not extend memory.
- Multi-turn: ``generate`` in transformers 5.23 continues a non-empty cache in two ways, both
  supported. (1) Pass the whole conversation so far (``generate``'s previous output plus the new
  turn): it feeds only the ``len(ids) - cache.get_seq_length()`` tokens the cache has not read,
  among them the last generated token, which ``generate`` returns without reading it. (2) Pass
  only the unread tokens together with ``attention_mask`` of ones over all
  ``cache.get_seq_length() + len(ids)`` tokens; without that mask ``generate`` would slice the ids.
- Single streams or unpadded batches only (a padded token would become a sink); greedy or
  sampled decoding, no beam search, no assisted decoding (they rewind the cache, and evicted
  tokens cannot come back).

Design, and why. transformers rotates q and k at ``position_ids`` *before* ``Cache.update`` and
then runs one attention call over whatever ``update`` returned, under a mask that
``masking_utils`` builds from ``get_mask_sizes`` with a causal rule. A causal rule can only show
each query a prefix of the keys, and the sinks need a different rotation for every query past
S+W, so no cache alone is exact for several queries at once (the per-query duplicated sinks
idea needs a non-causal mask too, and S x C extra keys). Re-rotating the S sink keys by a delta
per step is exact for one query only. So the cache works together with one attention function,
registered through the public ``AttentionInterface`` and switched on with
``model.set_attn_implementation`` by ``streaming()``/``enable()``: ``SinkLayer.update`` only
hands the new keys over; the attention function finds the layer through the buffer ``update``
returned and runs ``SinkLayer.attend``: ring writes, the policy's mask on the slots' stream
indices (``endless.attention.Slots``, the layout ``RingKV`` uses) and the same kernel
(``endless.attention.Kernel``), the S sink columns
recomputed with the query at ``min(t, S+W)``, in blocks of at most ``chunk`` queries so that the
ring of W + ``chunk`` slots never loses a key a query of the block still needs. For any other
cache the function is plain ``sdpa``, so the model keeps working as before.

Positions stay exact and bounded in effect. transformers computes its rotation angles in float32
from absolute positions, off by ~0.03 rad at 10^6. Those angles are reproducible bit for bit (one
float32 product, ``position_ids.float() * inv_freq``), so the attention function turns each new
query and key from transformers' float32 angle to ours with one small rotation whose angle,
``theta64(t) - theta32(position)``, is formed in float64 (``endless.rope``): keys end up rotated
once at their stream index, queries at theirs (and at ``min(t, S+W)`` for the sink columns),
exactly as in ``RingKV``. O(new tokens) per step; no cached key is ever rotated again. What
remains of transformers' float32 tables is the rounding of their cos/sin values (~1e-7), the
same at token 10^6 as at token 10 (tests/test_hf.py: log-probs at stream index 10^6 equal the
float64 Stream within 1e-4, where trusting transformers' angles is off by 0.4). The stream index
is the cache's own count: the ``position_ids`` a caller passes only tell which rotation to undo.
In bfloat16 the correction costs one more bfloat16 rounding of each new q and k (it is computed
in float32 and cast once). RoPE must be static (``check_supported`` refuses dynamic scaling).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from endless.attention import Kernel, Slots, additive
from endless.errors import EndlessError
from endless.models import check_supported
from endless.policies.spec import Policy, Sinks, check_fits, parse_policy
from endless.rope import rotate

ATTENTION = "endless_sinks"  # the name registered in transformers' AttentionInterface


class SinkLayer(CacheLayerMixin):
    """One layer's ring buffer: S sink slots, then W + ``chunk`` ring slots (``RingKV`` layout)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, policy: Sinks, chunk: int, rotary: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.n_sinks = policy.sinks
        self.chunk = chunk
        self.rotary = rotary  # transformers' rotary module: its inv_freq is what it rotated with
        self.mask_fn = policy.mask()
        self.slots = Slots(policy.sinks, policy.window + chunk)
        self.kernel = Kernel(policy.sinks)
        self.t = 0  # tokens read
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, kv, _, d = key_states.shape
        n = self.slots.capacity
        self.dtype, self.device, self.batch_size = key_states.dtype, key_states.device, b
        self.keys = torch.zeros(b, kv, n, d, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(
            b, kv, n, value_states.shape[-1], dtype=value_states.dtype, device=value_states.device
        )
        self.keys._endless_layer = self  # how the attention function finds this layer
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the new keys/values (rotated by transformers); ``attend`` writes them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._new is not None:
            raise RuntimeError(
                f"the model's attention is not {ATTENTION!r}: create the cache with endless.hf.streaming(model, spec)"
            )
        if key_states.shape[0] != self.batch_size:
            raise ValueError(f"batch size {key_states.shape[0]} != the cache's {self.batch_size}")
        self._new = (key_states, value_states)
        return self.keys, self.values

    def _corrections(
        self, positions: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (C, D) of the rotation from transformers' float32 angle at ``positions`` to
        the exact float64 angle at ``targets``."""
        inv = self.rotary.inv_freq.detach().float().cpu()
        theirs = (positions.cpu().float()[:, None] * inv[None, :]).double()  # bit for bit as in transformers
        ours = targets.cpu().double()[:, None] * inv.double()[None, :]
        delta = ours - theirs
        delta = torch.cat((delta, delta), dim=-1)
        return delta.cos().to(dtype).to(self.device), delta.sin().to(dtype).to(self.device)

    def attend(
        self,
        query: torch.Tensor,
        position_ids: torch.Tensor | None,
        scaling: float,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the new queries (B, H, C, D) under the policy; returns (B, H, C, D).
        Refused inputs leave the cache as it was."""
        if self._new is None:
            raise RuntimeError("attend() without update(): the cache did not see this layer's keys")
        k, v = self._new
        self._new = None
        c = query.shape[2]
        padded = attention_mask is not None  # masking_utils builds none for unpadded input (get_mask_sizes)
        if padded or position_ids is None or not bool((position_ids == position_ids[:1]).all()):
            raise EndlessError("endless.hf supports single streams or unpadded batches (no padding, equal positions)")
        pos_hf = position_ids[0].reshape(-1)
        pos = torch.arange(self.t, self.t + c)  # host bookkeeping; the corrections go to the device
        s, edge = self.n_sinks, self.policy.sinks + self.policy.window
        work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        cos, sin = self._corrections(pos_hf, pos, work)
        k = rotate(k.to(work), cos, sin).to(self.dtype)
        q = rotate(query.to(work), cos, sin).to(query.dtype) * scaling
        qs = None
        if s and self.t + c - 1 > edge:  # sinks at in-cache distance min(t, S+W) - j
            cos, sin = self._corrections(pos_hf, pos.clamp(max=edge), work)
            qs = rotate(query.to(work), cos, sin).to(query.dtype) * scaling
        out = torch.empty_like(query)
        g = query.shape[1] // self.keys.shape[1]
        for lo in range(0, c, self.chunk):  # the ring holds W + chunk slots: no query loses a key
            hi = min(lo + self.chunk, c)
            p = pos[lo:hi]
            slots = self.slots.occupy(p).to(self.device)
            self.keys.index_copy_(2, slots, k[:, :, lo:hi])
            self.values.index_copy_(2, slots, v[:, :, lo:hi])
            bias = additive(self.slots.visible(p, self.mask_fn)).to(self.device, self.dtype).expand(g, -1, -1)
            out[:, :, lo:hi] = self.kernel.chunk(q[:, :, lo:hi], self.keys, self.values, bias,
                                                 None if qs is None else qs[:, :, lo:hi])
        self.t += c
        return out

    def get_seq_length(self) -> int:
        return self.t

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask transformers builds is unused (``attend`` masks by slot); keep it trivially
        # causal over the new tokens so that sdpa's mask builder skips it.
        return query_length, self.t

    def get_max_length(self) -> int:
        return -1  # an endless stream

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        self.slots.pos.fill_(-1)
        self.t = 0
        self._new = None

    def crop(self, tokens_to_remove: int) -> None:
        raise EndlessError("a streaming cache cannot be rewound: evicted tokens are gone (no assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise EndlessError("beam search is not supported by the sinks cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise EndlessError("the sinks cache has a fixed batch; no beam search or num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise EndlessError("the sinks cache has a fixed batch")


class SinkCache(Cache):
    """StreamingLLM cache (docs/methods.md section 2) for a transformers Llama-family model whose
    attention is ``endless_sinks`` (see ``streaming``, which is the usual way to make one).

    ``policy`` is ``"sinks:S+W"`` or a ``Sinks``; ``chunk`` is how many queries of a long input
    are processed at a time (the ring holds S + W + chunk slots per layer).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        policy: "Policy | str" = "sinks:4+1020",
        *,
        chunk: int = 128,
        check_context: bool = True,
    ) -> None:
        policy = parse_policy(policy)
        if not isinstance(policy, Sinks):
            raise EndlessError(f"endless.hf implements sinks:S+W only, got {policy.spec}")
        if policy.sink_token is not None:
            raise EndlessError(
                f"{policy.spec}: prepend {policy.sinks} copies of token {policy.sink_token} to the input ids "
                f"and use sinks:{policy.sinks}+{policy.window}"
            )
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        cfg = model.config.get_text_config(decoder=True)
        check_supported(cfg)
        if getattr(cfg, "endless_zero_sink", False):  # endless.zero_sink: our Stream implements it, this adapter not
            raise EndlessError("a zero-sink model (endless_zero_sink in its config): stream it with endless.Stream, "
                               "not endless.hf")
        if check_context:
            check_fits(policy, cfg.max_position_embeddings)
        if model.config._attn_implementation != ATTENTION:
            raise EndlessError(
                f"the model's attention is {model.config._attn_implementation!r}, not {ATTENTION!r}: "
                "use endless.hf.streaming(model, spec), or endless.hf.enable(model) first"
            )
        self.policy = policy
        rotary = model.model.rotary_emb
        super().__init__(layers=[SinkLayer(policy, chunk, rotary) for _ in range(cfg.num_hidden_layers)])

    @property
    def spec(self) -> str:
        return self.policy.spec


def sinks_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention function: ``SinkLayer.attend`` when ``key`` is a SinkCache buffer,
    transformers' own ``sdpa`` otherwise. Returns ((B, C, H, D), None) like the built-in ones."""
    layer = getattr(key, "_endless_layer", None)
    if layer is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, kwargs.get("position_ids"), scale, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def enable(model: torch.nn.Module) -> None:
    """Register ``endless_sinks`` with transformers (once) and switch ``model`` to it. The model
    behaves as with ``sdpa`` for every cache but ``SinkCache``."""
    if ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION, sinks_attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(ATTENTION)


def streaming(
    model: torch.nn.Module, policy: "Policy | str" = "sinks:4+1020", *, chunk: int = 128, check_context: bool = True
) -> SinkCache:
    """Switch ``model`` to the sinks attention and return a fresh ``SinkCache`` for ``policy``;
    pass it as ``past_key_values`` to ``model.generate`` (or to the forward call) for every
    turn of one stream. One cache per stream; several caches may share a model."""
    enable(model)
    return SinkCache(model, policy, chunk=chunk, check_context=check_context)


__all__ = ["SinkCache", "SinkLayer", "streaming", "enable", "sinks_attention", "ATTENTION"]
