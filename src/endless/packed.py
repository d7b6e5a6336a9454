"""Inference-time weight packing for the per-token path (issue 5: a lean per-token path).

Decoding one token is a chain of matrix-vector products: every weight is read once per token,
so its speed is set by how fast the kernel streams the weights. Measured on this project's CPU
(AMD EPYC, AVX512-BF16, one thread, SmolLM2-135M, all 211 linears of one token):

- float32: ``F.linear`` on transformers' (out, in) weights streams ~16 GB/s; the same products
  on (in, out)-contiguous weights run 1.45x faster, oneDNN's prepacked weights
  (``torch.ops.mkldnn._linear_pointwise``, what inductor uses) another 7-17 % for one token
  and 2.2x for a 128-token chunk (123 against 53 GFLOP/s).
- bfloat16: ``F.linear`` runs at the same FLOP rate as float32 (no gain from half the bytes);
  oneDNN's prepacked bf16 weights run 1.7x faster.

On an AVX2-only CPU (AMD EPYC Zen 3) oneDNN has no bfloat16 path at all and PyTorch's bfloat16
GEMM runs a 64-row chunk 3.4x slower than the same product in float32 on the weight widened for
the call (``widened``: 1,004 against 279 ms for SmolLM2's products, two threads).

Those ranks are this CPU's: which kernel is fastest is measured per machine, model, dtype and
thread count by ``endless.kernels`` and passed here as ``kernel`` (and ``chunk_kernel`` for
inputs of many rows). Without a choice (``kernel="default"``) oneDNN is used when this torch has
it and it agrees with ``F.linear`` on a probe; else the transposed layout (float32) or
``F.linear``. Any named kernel that is missing or disagrees falls back the same way.

``Packed`` holds such copies of one model's decoder weights. Contract:

- The copies are a snapshot. The transformers modules stay the source of truth: ``Transformer``
  uses the packed weights only under ``torch.no_grad``/``inference_mode`` and only for layers
  whose modules and weights are still the ones packed (``valid``); anything else (training,
  LoRA adapters injected later, weights edited in place) runs the original modules, exactly.
- Results equal the modules' own up to float rounding (every kernel is probed against
  ``F.linear`` when packing; a kernel that is missing or disagrees is not used).
- Memory: one extra copy of the decoder and LM-head weights, allocated once (reported by
  ``nbytes``). That is the price of the speed; ``Transformer(..., pack=False)`` does without.
- ``compile=True`` (float32): one-token products run compiled kernels (``endless.gemv``, 1.4x
  the weight streaming rate; a second copy of the weights, and 20-60 s at load); chunks keep oneDNN's.
- ``weights="int8"`` (bfloat16 only, issue 21): the copies are per-channel int8 instead
  (``endless.int8``: half the bytes, PyTorch's ``_weight_int8pack_mm`` for a decoded token).
  Results then equal the modules' up to the quantisation, not float rounding: the probe is
  against the dequantised weight. The embeddings stay the modules' own bfloat16.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from endless.gemv import compiled_gemv
from endless.int4 import int4_linear
from endless.int8 import int8_linear

log = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]
# auto: packed in the model's dtype; int8 / int4: endless.int8 / endless.int4 (bfloat16 activations)
WEIGHTS = ("auto", "int8", "int4")
# The LM head (tied to the embeddings) stays int8 under int4 weights: at 4 bits it alone moved the
# embedded SmolLM2's perplexity +4.8 % (5.895 against 5.624, 4,096 tokens of the demo text), at 8
# bits with int4 decoder matrices +0.04 % (5.626). GGUF files keep it at 8 bits too: Q8_0 in the
# shipped one, whose decoder matrices are Q4_1, the grid endless.int4 recovers.
HEAD_QUANT = {"auto": "auto", "int8": "int8", "int4": "int8"}
# the eager one-token kernels a packed float matrix can use (endless.kernels times them per machine);
# "default" is the fixed preference order below (oneDNN, then the transposed layout, then F.linear)
# "widened" (bfloat16 only): the product in float32 on a copy widened for the call -- for chunks on
# CPUs without native bfloat16 products (AVX2: PyTorch's bfloat16 GEMM ran a 64-row chunk of
# SmolLM2's products in 932 ms where float32 took 190-243, AMD EPYC Zen 3)
KERNELS = ("default", "onednn", "transposed", "linear", "widened")


def _mkldnn_linear(w: torch.Tensor, bias: torch.Tensor | None) -> LinearFn | None:
    """oneDNN prepacked weight (float32 or bfloat16), or None when this torch/CPU lacks the op."""
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not hasattr(ops, "_reorder_linear_weight") or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = ops._reorder_linear_weight(w, 1)
    except (RuntimeError, NotImplementedError):
        return None
    fn = ops._linear_pointwise

    def linear(x: torch.Tensor) -> torch.Tensor:
        out = fn(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    linear.nbytes = packed.numel() * packed.element_size()  # type: ignore[attr-defined]
    return linear


def _transposed_linear(w: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    """x @ W^T with W^T stored (in, out)-contiguous: the fast layout for M=1 in float32."""
    wt = w.t().contiguous()

    def linear(x: torch.Tensor) -> torch.Tensor:
        # mm on a 2-D view: torch.matmul on (B, C, in) adds several dispatcher calls per use
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)
        return out.view(*x.shape[:-1], wt.shape[1])

    linear.nbytes = wt.numel() * wt.element_size()  # type: ignore[attr-defined]
    return linear


def pack_linear(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], *, compile: bool = False,
                quant: str = "auto", kernel: str = "default", chunk_kernel: str | None = None) -> LinearFn:
    """One function computing ``cat([F.linear(x, w, b) for w, b], -1)`` from a packed copy.

    ``kernel="default"`` takes the first of oneDNN, the transposed layout (float32) and
    ``F.linear`` that exists here and agrees with ``F.linear`` on a probe input; a named kernel
    (``KERNELS``, what ``endless.kernels`` measured fastest on this machine) is tried first and
    falls back the same way. ``chunk_kernel``, when it names another kernel, serves inputs of
    more than one row (chunks, FAM updates) from a second copy while ``kernel`` serves a decoded
    token (the fastest kernel for one row is not always the fastest for many). With
    ``compile``, one-row inputs go to a compiled kernel (``endless.gemv``, float32 only) when it
    can be built and agrees too.
    ``quant="int8"``: the fused weight quantised per output channel (``endless.int8``);
    ``quant="int4"``: in groups of 32 (``endless.int4``).
    The function carries ``nbytes`` and ``kernel`` (the name of what it runs).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    w = torch.cat([t.detach() for t in weights]) if len(weights) > 1 else weights[0].detach().clone()
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else w.new_zeros(t.shape[0]) for t, b in zip(weights, biases, strict=True)])
    else:
        bias = None
    if quant == "int8":
        fn = int8_linear(w, bias)
        fn.kernel = "int8"  # type: ignore[attr-defined]
        return fn
    if quant == "int4":
        return int4_linear(w, bias)
    fn = many = _eager(w, bias, kernel)
    if chunk_kernel not in (None, "default", fn.kernel):
        other = _eager(w, bias, chunk_kernel)
        many = other if other.kernel != fn.kernel else fn
    if compile:
        gemv = compiled_gemv(w, bias)
        if gemv is not None and _agrees(gemv, w, bias, rows=1):
            return _one_row_to(gemv, many, w.numel() * w.element_size(), name=f"compiled+{many.kernel}")
    if many is not fn:
        shared = fn.kernel == "linear" and many.kernel == "widened"  # both read the one fused ``w``
        return _one_row_to(fn, many, 0 if shared else fn.nbytes, name=f"{fn.kernel}/{many.kernel}")
    return fn


def _eager(w: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> LinearFn:
    """The eager kernel ``kernel`` for ``w``, or the first of the default order that works here."""
    order = [kernel] if kernel != "default" else []
    order += [k for k in ("onednn", "transposed", "linear") if k not in order]
    for name in order:
        fn = _BUILDERS[name](w, bias)
        if fn is not None and _agrees(fn, w, bias):
            break
        log.debug("%s kernel unavailable for %s %s", name, w.dtype, tuple(w.shape))
    fn.kernel = name  # type: ignore[attr-defined]
    return fn


def _plain_linear(w: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    """``F.linear`` on the fused (out, in) weight: no re-layout (the last resort, always exists)."""

    def linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, bias)

    linear.nbytes = w.numel() * w.element_size()  # type: ignore[attr-defined]
    return linear


def _widened_or_none(w: torch.Tensor, bias: torch.Tensor | None) -> LinearFn | None:
    """bfloat16 ``w`` multiplied in float32, widened per call (no second copy kept); else None."""
    if w.dtype != torch.bfloat16:
        return None
    b32 = None if bias is None else bias.float()

    def linear(x: torch.Tensor) -> torch.Tensor:
        # every bfloat16 is exact in float32, so this is F.linear with float32 accumulation and one
        # rounding of the output: what the bfloat16 kernels compute, up to their summation order
        return F.linear(x.float(), w.float(), b32).to(x.dtype)

    linear.nbytes = w.numel() * w.element_size()  # type: ignore[attr-defined]
    return linear


def _transposed_or_none(w: torch.Tensor, bias: torch.Tensor | None) -> LinearFn | None:
    return _transposed_linear(w, bias) if w.dtype == torch.float32 else None  # bfloat16 mm gains nothing from it


_BUILDERS: dict[str, Callable[[torch.Tensor, torch.Tensor | None], LinearFn | None]] = {
    "onednn": _mkldnn_linear, "transposed": _transposed_or_none, "linear": _plain_linear,
    "widened": _widened_or_none}


def _one_row_to(gemv: LinearFn, other: LinearFn, gemv_bytes: int, *, name: str) -> LinearFn:
    """``gemv`` for inputs of one row (decoding), ``other`` for the rest (chunks, FAM updates)."""

    def linear(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] != 1:
            return other(x)
        out = gemv(x2.contiguous())  # compiled for a contiguous (1, in) row
        return out.view(*x.shape[:-1], out.shape[-1])

    linear.nbytes = other.nbytes + gemv_bytes  # type: ignore[attr-defined]
    linear.compiled = name.startswith("compiled")  # type: ignore[attr-defined]
    linear.kernel = name  # type: ignore[attr-defined]
    return linear


def _agrees(fn: LinearFn, w: torch.Tensor, bias: torch.Tensor | None, rows: int = 3) -> bool:
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
    try:
        with torch.no_grad():
            got, want = fn(x).float(), F.linear(x, w, bias).float()
    except (RuntimeError, NotImplementedError):
        return False
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())))


def fast_rms_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``module``'s RMSNorm as one fused kernel, or None if it is not the standard one.

    transformers' Llama-family RMSNorm normalises in float32, casts back, then multiplies by the
    weight; for float32 that is ``F.rms_norm`` itself, for bfloat16 the cast stays where it was,
    and a single row (a decoded token) goes through ``F.layer_norm`` instead (see below). Both
    routes are probed against the module; a disagreeing one means no fast norm at all.
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or weight is None or eps is None or not hasattr(F, "rms_norm"):
        return None
    shape = (weight.shape[0],)
    if weight.dtype == torch.float32:

        def norm(x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, shape, weight, eps)
    else:
        double = (2 * shape[0],)

        def norm(x: torch.Tensor) -> torch.Tensor:
            if x.numel() == shape[0]:
                # one row (a decoded token): x / rms(x) is the layer norm of [x, -x] (mean 0,
                # variance mean(x^2)), one fused kernel that computes in float32 and rounds
                # once, where rms_norm of a cast runs ~8 small ops: 6.9 against 11.6 us
                return weight * F.layer_norm(torch.cat([x, -x], dim=-1), double, None, None, eps)[..., : shape[0]]
            return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)

    x = torch.randn(2, shape[0], generator=torch.Generator().manual_seed(1)).to(weight.dtype)
    rtol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    with torch.no_grad():  # both routes: the rows together and one row alone
        ok = all(torch.allclose(norm(r).float(), module(r).float(), rtol=rtol, atol=1e-5) for r in (x, x[:1]))
    return norm if ok else None


class PackedLayer:
    """Packed weights of one decoder layer plus what ``valid`` compares against."""

    __slots__ = ("qkv", "o", "gate_up", "down", "act", "norm_in", "norm_post", "split", "_attn", "_mlp", "_mods", "_weights", "_versions")

    def __init__(self, layer: torch.nn.Module, act: Callable[[torch.Tensor], torch.Tensor], *, compile: bool = False,
                 weights: str = "auto", kernel: str = "default", chunk_kernel: str | None = None) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        kw = {"compile": compile, "quant": weights, "kernel": kernel, "chunk_kernel": chunk_kernel}
        self.qkv = pack_linear([p.weight for p in projs], [p.bias for p in projs], **kw)
        self.split = [p.weight.shape[0] for p in projs]
        self.o = pack_linear([attn.o_proj.weight], [attn.o_proj.bias], **kw)
        self.gate_up = pack_linear([mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias], **kw)
        self.down = pack_linear([mlp.down_proj.weight], [mlp.down_proj.bias], **kw)
        self.act = act
        self.norm_in = fast_rms_norm(layer.input_layernorm) or layer.input_layernorm
        self.norm_post = fast_rms_norm(layer.post_attention_layernorm) or layer.post_attention_layernorm
        self._attn, self._mlp = attn, mlp
        self._mods = (*projs, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        self._weights = tuple(m.weight for m in self._mods)
        self._versions = tuple(w._version for w in self._weights)

    def valid(self, layer: torch.nn.Module) -> bool:
        """The layer still has the modules and weights that were packed (no LoRA, no edits).

        Called twice per layer and token, so it reads the modules' own dicts: nn.Module's
        ``__getattr__`` would cost ~1 us per lookup, ~15 us per call.
        """
        a, m = layer._modules["self_attn"], layer._modules["mlp"]
        if a is not self._attn or m is not self._mlp:
            return False
        am, mm = a._modules, m._modules
        mods = (am["q_proj"], am["k_proj"], am["v_proj"], am["o_proj"], mm["gate_proj"], mm["up_proj"], mm["down_proj"])
        return (
            all(map(operator.is_, mods, self._mods))
            and all(map(operator.is_, (t._parameters["weight"] for t in mods), self._weights))
            and tuple(t._version for t in self._weights) == self._versions
        )

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in (self.qkv, self.o, self.gate_up, self.down))


class Packed:
    """Packed decoder layers and LM head of one model (see the module docstring)."""

    def __init__(self, layers: Sequence[torch.nn.Module], lm_head: torch.nn.Module, act_name: str, *,
                 compile: bool = False, weights: str = "auto", kernel: str = "default",
                 chunk_kernel: str | None = None) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        act = F.silu if act_name == "silu" else None
        self.weights = weights
        self.layers = [PackedLayer(layer, act or layer.mlp.act_fn, compile=compile, weights=weights, kernel=kernel,
                                   chunk_kernel=chunk_kernel) for layer in layers]
        # the LM head is the largest matrix (49152 x 576 in SmolLM2, tied to the embeddings, which
        # keep their own bfloat16 copy for the lookup): quantised too
        self.head = pack_linear([lm_head.weight], [lm_head.bias], compile=compile, quant=HEAD_QUANT[weights], kernel=kernel,
                                chunk_kernel=chunk_kernel)
        fns = self.linears()
        self.compiled = sum(getattr(f, "compiled", False) for f in fns)  # matrices with a compiled one-token kernel
        # what the matrices run, e.g. "onednn" (a name per kernel, joined when they differ)
        self.kernel = "/".join(sorted({f.kernel for f in fns}))
        self._head_snapshot = (id(lm_head.weight), lm_head.weight._version)
        self.lm_head = lm_head

    def linears(self) -> list[LinearFn]:
        """Every packed matrix of one decoded token, in order (each layer's four, then the head)."""
        return [f for p in self.layers for f in (p.qkv, p.o, p.gate_up, p.down)] + [self.head]

    def head_valid(self) -> bool:
        return (id(self.lm_head.weight), self.lm_head.weight._version) == self._head_snapshot

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.layers) + self.head.nbytes
