"""Our one forward path over Llama-family weights (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM).

Contract (docs/methods.md section 4): the weights and the per-layer modules are the ones transformers
loaded (norms, projections, MLP, embeddings, LM head), so LoRA adapters from peft apply to this
path unchanged; what is ours is everything between the projections: RoPE with float64 angles
(``endless.rope``), GQA attention, and where the keys/values live (an ``Attention`` backend, one
per policy). With the dense backend the logits equal ``hf_model(ids).logits`` (float32, max abs
diff <= 1e-4) -- ``endless verify`` and tests/test_transformer.py check it per family.

``Transformer(hf_model, pack=True)`` (or ``.pack()``) adds packed copies of the weights for
inference (``endless.packed``: fused q/k/v and gate/up in the layout the CPU kernels stream
fastest, fused RMSNorm): 1.4-1.7x faster per decoded token, at the cost of one more copy of
the weights. They are used only without autograd and only while the modules are the ones
packed, so training and LoRA always run transformers' modules. ``compile=True`` adds compiled
one-token kernels on top (``endless.gemv``, float32: another 1.4x on the weight products).
``weights="int8"`` (issue 21; bfloat16 models, implies ``pack``) makes those copies per-channel
int8 (``endless.int8``): half the bytes per decoded token, results within the quantisation error.
All are CPU kernels: on CUDA (``device="cuda"`` or a model already there) they are skipped and
the modules run as they are, attention through PyTorch's own kernels.

The keys/values live in a cache (``endless.policies.base.Cache``): ``forward`` calls its
``begin(C)`` for the C new tokens, then ``attend(layer, q, k, v)`` for layer 0, 1, ... with
un-rotated ``q`` (B, H, C, D) and ``k, v`` (B, KV, C, D), which returns (B, H, C, D), then ``end()``.

A config with ``endless_zero_sink: true`` (``endless.zero_sink``) sets ``zero_sink``: every cache
then attends with softmax-off-by-one ("Efficient Streaming Language Models with Attention Sinks",
section 3.3), as the model was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from endless.packed import Packed, PackedLayer
from endless.policies.base import Cache
from endless.rope import Rope


@dataclass(frozen=True)
class Dims:
    """Sizes of a model that the runtime needs."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    context: int  # trained context length (max_position_embeddings)


def check_weights(weights: str, dtype: torch.dtype, device: torch.device, *, compile: bool = False) -> None:
    """Refuse (one line, :class:`EndlessError`) a ``weights`` choice this model cannot run.

    int8 and int4 weights run bfloat16 activations on the CPU: float32 activations through
    PyTorch's int8 kernel take 20-60x oneDNN's bfloat16 time (``endless.int8``), its int4 kernel
    takes bfloat16 only (``endless.int4``), and there is no CUDA kernel here."""
    from endless.errors import EndlessError
    from endless.packed import WEIGHTS

    if weights not in WEIGHTS:
        raise EndlessError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "auto":
        return
    if dtype != torch.bfloat16:
        raise EndlessError(f"{weights} weights run bfloat16 activations (PyTorch's {weights} kernels take bfloat16 "
                           f"inputs; with {dtype} the int8 one is 20-60x slower); use --dtype bfloat16")
    if device.type != "cpu":
        raise EndlessError(f"{weights} weights are CPU kernels; on CUDA use --weights auto")
    if compile:
        raise EndlessError(f"--compile is for float32; {weights} weights run their own kernels, drop --compile")


class Transformer:
    """A Llama-family causal LM seen as embed -> layers (qkv, attention, rest) -> logits."""

    def __init__(self, hf_model: torch.nn.Module, *, pack: bool = False, compile: bool = False,
                 weights: str = "auto", kernel: str = "auto", device: "str | torch.device | None" = None) -> None:
        from endless.device import resolve_device
        from endless.models import check_supported, model_identity
        from endless.zero_sink import uses_zero_sink

        check_supported(hf_model.config)
        if device is not None:
            hf_model.to(resolve_device(device))
        cfg = hf_model.config
        self.hf = hf_model
        base = hf_model.model
        self.embed_tokens = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.lm_head = hf_model.lm_head
        self.rope = Rope.from_hf(hf_model)  # on the device of the model's rotary buffer: its weights'
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dims = Dims(
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            hidden=cfg.hidden_size,
            vocab=cfg.vocab_size,
            context=cfg.max_position_embeddings,
        )
        self.scale = head_dim**-0.5
        # softmax-off-by-one in every attention (a model pre-trained with a zero sink, endless.zero_sink)
        self.zero_sink = uses_zero_sink(cfg)
        self.identity = model_identity(hf_model)
        self.packed: Packed | None = None
        self._pack_wanted = False
        self._weights = "auto"
        self._kernel = "auto"
        self.kernel_choice = None  # endless.kernels.Choice when the packed kernel was chosen by measuring
        self._act = getattr(cfg, "hidden_act", None)
        self.step = None  # endless.step.CompiledStep once compile_step() was called
        if pack or compile or weights != "auto":
            self.pack(compile=compile, weights=weights, kernel=kernel)

    def compile_step(self) -> "Transformer":
        """Decode tokens of ring states (sinks, window, BSWA) through one compiled graph per token
        (``endless.step``: 1.1-1.3x faster per token on the CPU, ~30-60 s of compilation per ring
        size, one more copy of the weights). Packs the weights if they are not yet. Raises
        :class:`EndlessError` where it cannot run (CUDA, no C++ compiler)."""
        from endless.step import CompiledStep

        if self.packed is None and self.device.type == "cpu":
            self.pack()
        self.step = CompiledStep(self)
        return self

    def pack(self, *, compile: bool = False, weights: str = "auto", kernel: str = "auto") -> "Transformer":
        """Build (or rebuild, after changing weights) the packed inference weights; returns self.

        ``compile`` also compiles the one-token products (``endless.gemv``: float32, 1.15-1.5x
        faster per decoded token, a second copy of the weights, 20-60 s now). ``weights="int8"``
        packs per-channel int8 copies instead (``endless.int8``; bfloat16 and CPU only, else
        :class:`EndlessError`). ``kernel``: ``"auto"`` uses the kernel measured fastest on this
        CPU for this model (``endless.kernels``: measured once, cached; with ``compile`` the
        compiled kernels are kept only if faster), ``"default"`` the fixed preference order, or a
        name of ``endless.packed.KERNELS``. CPU only: on another device this does nothing (the
        modules serve every call)."""
        from endless.errors import EndlessError
        from endless.packed import KERNELS

        check_weights(weights, self.dtype, self.device, compile=compile)
        if kernel != "auto" and kernel not in KERNELS:
            raise EndlessError(f"kernel must be auto or one of {', '.join(KERNELS)}, got {kernel!r}")
        self._pack_wanted = True
        self._weights = weights
        self._kernel = kernel
        self.kernel_choice = None
        if self.device.type != "cpu":
            self.packed = None
            return self
        if kernel == "auto" and weights == "auto":
            from endless import kernels

            self.packed = None  # the previous copies are not needed while the candidates are timed
            choice = self.kernel_choice = kernels.choose(self, compile=compile)
            self.packed = Packed(self.layers, self.lm_head, self._act, compile=choice.compiled,
                                 kernel=choice.kernel, chunk_kernel=choice.chunk_kernel)
            return self
        self.packed = Packed(self.layers, self.lm_head, self._act, compile=compile, weights=weights,
                             kernel="default" if kernel == "auto" else kernel)
        return self

    def to(self, device: "str | torch.device") -> "Transformer":
        """Move the weights (and the RoPE tables) to ``device``; returns self. Packed CPU
        kernels are dropped when leaving the CPU and rebuilt (uncompiled) when coming back."""
        from endless.device import resolve_device

        device = resolve_device(device)
        if device == self.device:
            return self
        self.hf.to(device)
        self.rope = self.rope.to(device)
        prompt = getattr(self, "fam_prompt", None)
        if prompt is not None:
            prompt.to(device)
        self.packed = None
        self.step = None  # compiled for the CPU weights; call compile_step() again there
        if self._pack_wanted and device.type == "cpu":  # elsewhere the modules serve every call
            self.pack(weights=self._weights, kernel=self._kernel)
        return self

    def _fast(self, i: int) -> PackedLayer | None:
        """The packed layer ``i`` if it may serve this call (no autograd, modules unchanged)."""
        p = self.packed
        if p is None or torch.is_grad_enabled():
            return None
        if torch.compiler.is_compiling():
            # the compiled step (endless.step), which checked validity before its call: float
            # weights run the modules (inductor freezes and prepacks them itself and cannot lower
            # the packed copies' oneDNN handles); int8/int4 copies are plain tensors it can call
            # PyTorch's kernels on
            return None if p.weights == "auto" else p.layers[i]
        layer = p.layers[i]
        return layer if layer.valid(self.layers[i]) else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # -- the pieces of one layer, shared by every policy and by FAM ---------------------------

    def qkv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm and project hidden states (B, C, d) to un-rotated q (B, H, C, D), k, v (B, KV, C, D)."""
        layer = self.layers[i]
        attn = layer.self_attn
        b, c, _ = x.shape
        d = self.dims.head_dim
        fast = self._fast(i)
        if fast is not None:
            qkv = fast.qkv(fast.norm_in(x))  # (B, C, (H + 2 KV) * D)
            q, k, v = (t.view(b, c, -1, d) for t in qkv.split(fast.split, dim=-1))
        else:
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, c, -1, d)
            k = attn.k_proj(h).view(b, c, -1, d)
            v = attn.v_proj(h).view(b, c, -1, d)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before RoPE
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def finish(self, i: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, post-norm MLP, residual. attn_out is (B, H, C, D)."""
        layer = self.layers[i]
        b, _, c, _ = attn_out.shape
        o = attn_out.transpose(1, 2).reshape(b, c, -1)
        fast = self._fast(i)
        if fast is not None:
            x = x + fast.o(o)
            g, u = fast.gate_up(fast.norm_post(x)).chunk(2, dim=-1)
            return x + fast.down(fast.act(g) * u)
        x = x + layer.self_attn.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: (B, C, d) -> (B, C, V)."""
        p = self.packed
        compiling = torch.compiler.is_compiling()  # as in _fast: validity checked by the compiled step
        if (p is not None and not torch.is_grad_enabled()
                and (p.weights != "auto" if compiling else p.head_valid())):
            return p.head(self.norm(x))
        return self.lm_head(self.norm(x))

    def forward(self, ids: torch.Tensor, cache: Cache, *, last_only: bool = False) -> torch.Tensor:
        """Run ids (B, C) through every layer with ``cache`` holding the keys/values.

        Returns logits (B, C, V), or (B, 1, V) with ``last_only`` (what decoding needs; the LM
        head over a 49k vocabulary is as costly as several layers).
        """
        cache.begin(ids.shape[1])
        x = self.embed_tokens(ids)
        for i in range(self.dims.n_layers):
            q, k, v = self.qkv(i, x)
            x = self.finish(i, x, cache.attend(i, q, k, v))
        cache.end()
        if last_only:
            x = x[:, -1:]
        return self.logits(x)
