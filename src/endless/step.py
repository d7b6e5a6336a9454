"""A decoded token of a ring state as one compiled graph (issue 21: the per-token overhead).

Eager decoding runs ~65 tensor ops per layer, each a Python call and a dispatch (~130 dispatcher
entries per layer in the profiler). On a 2-core Intel Xeon (AMX) with SmolLM2-135M in bfloat16
those cost ~8 ms of a 33 ms token at two threads, more than the attention's arithmetic. Here
the whole token -- embedding, every layer, the LM head -- is one TorchInductor graph, traced from
the code the eager path runs (``Transformer.qkv``/``finish``/``logits`` over the transformers
modules, ``endless.policies.ring.attend_one`` and ``endless.attention.Kernel.one`` for the ring
write, the rotations and the attention with StreamingLLM's sink columns):

- weights frozen into the graph, so inductor prepacks every projection for oneDNN (what
  ``endless.packed`` does by hand) and fuses the element-wise work between them into C++ loops;
- a C++ wrapper (``cpp_wrapper``): the graph's calls are made from C++, not Python;
- the ring buffers are inputs the graph writes in place (one slot per layer), so the state stays
  ``RingKV``'s own: chunks, snapshots, save/resume and the eager path keep working on it.

Measured (``benchmarks/bench-xeon``, "A compiled decode step"): 1.23-1.31x faster per bfloat16
token than the eager path on that Xeon, 1.12-1.22x in float32, 1.2x with int4 weights. float32
graphs autotune their products (``AUTOTUNE``): on an AMD EPYC (Zen 5) a float32 token took 19.4
instead of 31.0 ms with one thread (``benchmarks/bench-epyc``, "float32 products"). So do
bfloat16 graphs on a CPU where oneDNN has no bfloat16 path (AVX2 only): 16.3 instead of 151.8 ms on
an AMD EPYC Zen 3 (``benchmarks/bench-zen3``).

Contract:

- Same numbers as ``RingKV``'s eager one-token path up to float rounding (float32: logits within
  1e-4, tests/test_step.py; greedy text identical) for sinks, window and BSWA rings, any batch,
  every supported family, with or without the zero sink. In bfloat16 the products round in
  another order, so greedy text can part from the eager one at a near-tie. Chunks, growing (dense) caches, FAM, training, and weights
  changed after packing (LoRA injected, edited in place: the graph holds a snapshot and serves
  only while the ``Transformer.packed`` it was built with is valid) run the eager path.
- int8/int4 weights (``endless.int8``, ``endless.int4``) run their packed copies through
  PyTorch's kernels inside the graph, the same calls as eager; float weights run the modules,
  which inductor freezes and prepacks.
- Refused (``EndlessError``, one line): CUDA, no C++ compiler. A graph that fails to compile
  (an unsupported build, a broken compiler) logs one warning and the eager path serves from then on.
- One graph per (batch, ring size, number of sinks, dtype, threads); each costs ~30-60 s of compilation
  for SmolLM2-135M the first time (autotuned graphs: ~90 s, up to ~3 min on a slower CPU).
  ``new_graphs = False`` stops compiling more (a server, ``endless serve --compile-step``, compiles
  its graphs at startup and must not stall every request for a new one): a state without a
  graph then decodes eagerly.
- Memory: inductor keeps its own packed copy of the weights (one more copy, as ``pack`` does).
- Generated code runs with the thread count current at compile time, so the count is part of
  the key.
"""

from __future__ import annotations

import logging
import shutil

import torch

from endless.attention import Kernel
from endless.cpu import onednn_bfloat16
from endless.gemv import AUTOTUNE
from endless.policies.ring import attend_one

log = logging.getLogger(__name__)

# freezing: weights become constants inductor may prepack (oneDNN) at compile time -- the reason
# the compiled step is faster than eager at all; set through config.patch, because torch.compile's
# options= does not turn it on (torch 2.13: the projections then run unpacked aten::mm and the token
# takes 1.3x longer, bfloat16 on the Xeon).
# cpp_wrapper: the graph's kernel calls are made from generated C++ (1.04-1.11x over Python's).
# concat_linear: q/k/v and gate/up, which read the same input, become one prepacked product each
# (as endless.packed fuses them): 38.4 against 42.4 ms a bfloat16 token, one thread.
INDUCTOR = {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True}
# float32 graphs also autotune their products: inductor times its C++ GEMM template against the
# library call for each shape and keeps the faster. For one row the template streams float32 weights
# at 77-85 % of the read bandwidth where the oneDNN/MKL calls reach 56-58 % (AMD EPYC, Zen 5):
# 19.4 against 31.0 ms a SmolLM2 token, one thread, logits within 3e-6; compiling takes ~90 s instead of ~45.
# bfloat16 graphs keep oneDNN's prepacked products where oneDNN has a bfloat16 path (the template
# only tied it on the EPYC, endless.gemv), and autotune where it has none (an AVX2-only CPU): there
# frozen bfloat16 weights fall to PyTorch's slow bfloat16 GEMM on an (in, out) copy, 151.8 ms a
# SmolLM2 token against 38.2 eager, and autotuned 16.3 ms (AMD EPYC Zen 3, two threads).
# AUTOTUNE is endless.gemv's (imported above): the same autotuning of products, one definition.
# every graph of a process is compiled from the one code object ``_Graph.forward`` (one per
# model, ring size, dtype, ...), and dynamo counts each as a recompilation of it: its default limit
# of 8 would refuse the ninth (a bench over two dtypes and several caches, a test session)
DYNAMO = {"recompile_limit": 256, "accumulated_recompile_limit": 4096}


def options(dtype: torch.dtype, weights: str = "auto") -> dict:
    """Inductor's options for a graph whose weights are ``dtype`` (``weights``: ``endless.packed.WEIGHTS``)
    on this CPU (see ``AUTOTUNE``). int8/int4 graphs are never autotuned: their products are
    PyTorch's quantised kernels, and autotuning swapped in inductor's own templates for them, which
    gave wrong logits (off by up to 11 on the tiny model, torch 2.13, AVX2)."""
    autotune = weights == "auto" and (dtype == torch.float32 or (dtype == torch.bfloat16 and not onednn_bfloat16()))
    return {**INDUCTOR, **AUTOTUNE} if autotune else dict(INDUCTOR)


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why no compiled step can run for weights on ``device`` in ``dtype`` here, or None."""
    if device.type != "cpu":
        return "the compiled step is a CPU path (CUDA runs PyTorch's own kernels)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the compiled step runs float32 or bfloat16, not {dtype}"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "the compiled step needs a C++ compiler (g++ or clang++) on the PATH"
    return None


def unsupported(model) -> str | None:
    """Why ``model`` cannot decode through a compiled step, or None if it can."""
    reason = unavailable(model.device, model.dtype)
    if reason is None and model.packed is None:
        return "the compiled step needs the packed inference weights (pack=True)"
    return reason


class _Graph(torch.nn.Module):
    """One decoded token over every layer: what ``torch.compile`` traces. It runs the model's own
    layer code (``Transformer.qkv``, ``finish``, ``logits``: the transformers modules, whose
    weights inductor freezes, or the int8/int4 copies of ``endless.packed``) and the ring's own
    one-token attention (``policies.ring.attend_one``, ``endless.attention.Kernel.one``): nothing
    here is a second implementation."""

    def __init__(self, model, kernel: Kernel) -> None:
        super().__init__()
        self.hf = model.hf  # registered, so the weights are this module's parameters (frozen when compiled)
        self.model = model
        self.kernel = kernel

    def forward(self, ids, ks: list[torch.Tensor], vs: list[torch.Tensor], slots, rk, rq, bias):
        m = self.model
        x = m.embed_tokens(ids)
        for i in range(m.dims.n_layers):
            q, k, v = m.qkv(i, x)
            x = m.finish(i, x, attend_one(self.kernel, ks[i], vs[i], slots, rk, rq, bias, q, k, v))
        return m.logits(x)


class CompiledStep:
    """The compiled one-token step of ``model`` for every ring state that asks (``serves``)."""

    def __init__(self, model) -> None:
        reason = unsupported(model)
        if reason is not None:
            from endless.errors import EndlessError

            raise EndlessError(reason)
        self.model = model
        self._packed = model.packed  # the snapshot whose validity says the graph's weights are current
        self._graphs: dict[tuple, object] = {}
        self._ran: set = set()  # graphs that have run once (compiled): a later failure is a real error
        self.failed: str | None = None  # why compiling failed: then the eager path serves every step
        self.new_graphs = True  # compile a graph for a state that has none (else: it decodes eagerly)
        self._inductor = options(model.dtype, model.packed.weights)

    def serves(self, state) -> bool:
        """Whether ``state``'s next one-token step can run here (else: the eager path)."""
        m = self.model
        p = m.packed
        return (self.failed is None and not state.growable and not torch.is_grad_enabled() and p is self._packed
                and (self.new_graphs or self._key(state) in self._graphs)
                and p.head_valid()
                and all(layer.valid(m.layers[i]) for i, layer in enumerate(p.layers)))

    def compiled_for(self, state) -> bool:
        """Whether a graph for ``state``'s shape was built (by an earlier step of such a state)."""
        return self._key(state) in self._graphs

    def _key(self, state) -> tuple:
        return (state.batch, state.capacity, state.n_sinks, self.model.dtype, torch.get_num_threads())

    def _graph(self, state):
        key = self._key(state)
        fn = self._graphs.get(key)
        if fn is None:
            log.warning("compiling the decode step for %d stream(s) of %d slots (%s, %d thread(s)); "
                        "the first token takes 30-90 s, later ones run compiled", state.batch, state.capacity,
                        str(self.model.dtype).removeprefix("torch."), torch.get_num_threads())
            kernel = Kernel(state.n_sinks, zero_sink=self.model.zero_sink)
            fn = self._graphs[key] = torch.compile(_Graph(self.model, kernel), fullgraph=True, dynamic=False)
        return fn

    def __call__(self, state, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per stream (ids (B, 1)) through ``state``; logits (B, 1, V)."""
        state.begin(1)
        st = state.prepared
        rq = st.rq
        if state.n_sinks and rq.shape[1] == self.model.dims.head_dim:
            # a young stream: the sinks are scored by the query itself, so its rotation twice gives
            # the same scores and one graph serves before and after the first eviction
            rq = torch.cat([rq, rq], dim=1)
        ks, vs = state.layer_views()
        fn = self._graph(state)
        try:
            # on every call, not only the first: should dynamo ever recompile (a guard failing on
            # new input strides), the new graph is frozen too; the two patches cost ~40 us a token
            with torch._inductor.config.patch(self._inductor), torch._dynamo.config.patch(DYNAMO):
                logits = fn(ids, ks, vs, st.slots, st.rk, rq, st.bias)
        except Exception as e:  # noqa: BLE001 -- any failure to build the graph means: decode eagerly
            if fn in self._ran:
                raise
            # compilation failed before the graph wrote anything: this stream and every later one
            # decode eagerly (``begin`` is repeated by the eager forward with the same position)
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("the compiled decode step could not be built (%s); decoding eagerly", self.failed)
            return self.model.forward(ids, state, last_only=True)
        self._ran.add(fn)
        state.end()
        return logits


__all__ = ["CompiledStep", "options", "unavailable", "unsupported"]
