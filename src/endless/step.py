"""A decoded token of a ring state as one compiled graph (issue 21: the per-token overhead).

Eager decoding runs ~65 tensor ops per layer, each a Python call and a dispatch (~130 dispatcher
entries per layer in the profiler). On a 2-core Intel Xeon (AMX) with SmolLM2-135M in bfloat16
those cost ~8 ms of a 33 ms token at two threads, more than the attention's arithmetic. Here
the whole token -- embedding, every layer (norms, projections, RoPE as the same (D, D) rotation
products as ``endless.policies.ring``, the ring write, attention with StreamingLLM's sink columns,
MLP) and the LM head -- is one TorchInductor graph:

- weights frozen into the graph, so inductor prepacks every projection for oneDNN (what
  ``endless.packed`` does by hand) and fuses the element-wise work between them into C++ loops;
- a C++ wrapper (``cpp_wrapper``): the graph's calls are made from C++, not Python;
- the ring buffers are inputs the graph writes in place (one slot per layer), so the state stays
  ``RingKV``'s own: chunks, snapshots, save/resume and the eager path keep working on it.

Measured (``benchmarks/bench-xeon``): 1.27x (one thread) and 1.40x (two threads) faster per
bfloat16 token than the eager path on that Xeon, 1.13x / 1.22x in float32.

Contract:

- Same numbers as ``RingKV``'s eager one-token path up to float rounding (float32: logits within
  1e-4, tests/test_step.py), for sinks, window and BSWA rings, any batch, with or without the zero
  sink. What it does not cover -- chunks, growing (dense) caches, FAM, LoRA or edited weights
  (the graph holds a snapshot: it serves only while ``Transformer.packed`` is still valid),
  int8/int4 weights, Qwen3's per-head norms, non-SiLU MLPs, CUDA -- runs the eager path.
- One graph per (batch, ring size, sinks or not, dtype, threads); each costs ~30-60 s of
  compilation the first time (a C++ compiler is needed; without one ``compile_step`` refuses).
- Memory: inductor keeps its own packed copy of the weights (one more copy, as ``pack`` does).
- Generated code runs with the thread count current at compile time, so the count is part of
  the key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from endless.attention import off_by_one_softmax

# freezing: weights become constants inductor may prepack (oneDNN) at compile time -- the reason
# the compiled step is faster than eager at all; set through config.patch, because torch.compile's
# options= does not turn it on (torch 2.13: the projections then run unpacked aten::mm, 1.6x slower).
# cpp_wrapper: the graph's kernel calls are made from generated C++ (1.04-1.11x over Python's).
# concat_linear: q/k/v and gate/up, which read the same input, become one prepacked product each.
INDUCTOR = {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True}


def unsupported(model) -> str | None:
    """Why ``model`` cannot decode through a compiled step, or None if it can."""
    cfg = model.hf.config
    if model.device.type != "cpu":
        return "the compiled step is a CPU path (CUDA runs PyTorch's own kernels)"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"the compiled step runs float32 or bfloat16, not {model.dtype}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"the compiled step has a SiLU MLP, this model uses {cfg.hidden_act}"
    if hasattr(model.layers[0].self_attn, "q_norm"):
        return "the compiled step has no per-head query/key norms (Qwen3)"
    if model.packed is None or getattr(model, "_weights", "auto") != "auto":
        return "the compiled step needs packed float weights (pack=True, weights='auto')"
    return None


class _Graph(torch.nn.Module):
    """One decoded token over every layer: the module ``torch.compile`` traces. Its parameters
    are the model's own tensors (no copies), frozen into the compiled graph."""

    def __init__(self, model, *, sink_split: bool) -> None:
        super().__init__()
        hf = model.hf
        d = model.dims
        self.h, self.kv, self.d = d.n_heads, d.n_kv_heads, d.head_dim
        self.sink_split = sink_split
        self.zero_sink = model.zero_sink
        self.eps = [(layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
                    for layer in model.layers]
        self.final_eps = model.norm.variance_epsilon

        def frozen(t: torch.Tensor | None) -> torch.nn.Parameter | None:
            return None if t is None else torch.nn.Parameter(t.detach(), requires_grad=False)

        self.embed = frozen(hf.model.embed_tokens.weight)
        self.layers = torch.nn.ModuleList()
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            w = torch.nn.Module()
            for name, mod in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj),
                              ("gate", m.gate_proj), ("up", m.up_proj), ("down", m.down_proj)):
                setattr(w, name, frozen(mod.weight))
                setattr(w, name + "_b", frozen(mod.bias))
            w.n1, w.n2 = frozen(layer.input_layernorm.weight), frozen(layer.post_attention_layernorm.weight)
            self.layers.append(w)
        self.norm = frozen(model.norm.weight)
        self.head = frozen(model.lm_head.weight)
        self.head_b = frozen(getattr(model.lm_head, "bias", None))

    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        # transformers' Llama RMSNorm: normalise in float32, round, then scale in the model dtype
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    def forward(self, ids, ks: list[torch.Tensor], vs: list[torch.Tensor], slots, rk, rq, bias, sink_cols):
        h, kv, d = self.h, self.kv, self.d
        g = h // kv
        b = ids.shape[0]
        x = F.embedding(ids, self.embed)  # (B, 1, hidden)
        for i, w in enumerate(self.layers):
            eps_in, eps_post = self.eps[i]
            hn = self._rms(x, w.n1, eps_in)
            q = F.linear(hn, w.q, w.q_b)
            k = F.linear(hn, w.k, w.k_b)
            v = F.linear(hn, w.v, w.v_b)
            # the key rotated once at its stream index, rounded once (RingKV's one-token path)
            kr = (k.reshape(-1, d).float() @ rk).to(x.dtype).view(b, kv, 1, d)
            ks[i].index_copy_(2, slots, kr)
            vs[i].index_copy_(2, slots, v.view(b, kv, 1, d))
            qq = (q.reshape(-1, d).float() @ rq).to(x.dtype)  # (B*H, D or 2D), rows (b, kv, g)
            n = ks[i].shape[2]
            kf = ks[i].view(b * kv, n, d)
            if self.sink_split:
                # [query at t | query at S+W] per row: one product scores both; the sink columns
                # take the second's scores (StreamingLLM's in-cache position for the sinks)
                both = torch.bmm(qq.view(b * kv, 2 * g, d), kf.transpose(1, 2)).view(b * kv, g, 2, n)
                scores = torch.where(sink_cols, both[:, :, 1], both[:, :, 0])
            else:
                scores = torch.bmm(qq.view(b * kv, g, d), kf.transpose(1, 2))
            scores = scores + bias
            p = off_by_one_softmax(scores) if self.zero_sink else torch.softmax(scores.float(), dim=-1)
            o = torch.bmm(p.to(x.dtype), vs[i].view(b * kv, n, d)).reshape(b, 1, h * d)
            x = x + F.linear(o, w.o, w.o_b)
            hn = self._rms(x, w.n2, eps_post)
            x = x + F.linear(F.silu(F.linear(hn, w.gate, w.gate_b)) * F.linear(hn, w.up, w.up_b), w.down, w.down_b)
        return F.linear(self._rms(x, self.norm, self.final_eps), self.head, self.head_b)


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
        self._views: dict[int, tuple] = {}  # id(state.k) -> (k, v, per-layer views): unbind once per buffer

    def serves(self, state) -> bool:
        """Whether ``state``'s next one-token step can run here (else: the eager path)."""
        m = self.model
        p = m.packed
        return (not state.growable and not torch.is_grad_enabled() and p is self._packed and p.head_valid()
                and all(layer.valid(m.layers[i]) for i, layer in enumerate(p.layers)))

    def _graph(self, state, sink_split: bool):
        key = (state.batch, state.capacity, sink_split, self.model.dtype, torch.get_num_threads())
        fn = self._graphs.get(key)
        if fn is None:
            fn = self._graphs[key] = torch.compile(_Graph(self.model, sink_split=sink_split), fullgraph=True,
                                                   dynamic=False)
        return fn

    def _layer_views(self, state) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cached = self._views.get(id(state.k))
        if cached is None or cached[0] is not state.k or cached[1] is not state.v:
            cached = (state.k, state.v, list(state.k.unbind(0)), list(state.v.unbind(0)))
            if len(self._views) > 64:  # states come and go (serve): keep the table small
                self._views.clear()
            self._views[id(state.k)] = cached
        return cached[2], cached[3]

    def __call__(self, state, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per stream (ids (B, 1)) through ``state``; logits (B, 1, V)."""
        state.begin(1)
        st = state.prepared
        d = self.model.dims.head_dim
        sink_split = state.n_sinks > 0
        rq = st.rq
        if sink_split and rq.shape[1] == d:  # young stream: the sinks' query is the query itself
            rq = torch.cat([rq, rq], dim=1)
        ks, vs = self._layer_views(state)
        sink_cols = state.sink_columns
        with torch._inductor.config.patch(INDUCTOR):
            logits = self._graph(state, sink_split)(ids, ks, vs, st.slots, st.rk, rq, st.bias, sink_cols)
        state.end()
        return logits


__all__ = ["CompiledStep", "unsupported"]
