"""Per-machine choice of the one-token kernel (issue 21, part 1).

Decoding a token streams every weight matrix once, and which kernel streams fastest depends on
the CPU, not on the code: on the AMD EPYC this project was tuned on, oneDNN's prepacked weights
beat ``F.linear`` 1.7x in bfloat16, while on an Intel Xeon with AMX the same commit decoded
bfloat16 at 9.1 GB/s against 13.7-14.4 GB/s in float32 (docs/results.md, issue 21). So the
choice is measured where the model runs instead of fixed:

- ``measure(model)`` builds the model's packed matrices once per candidate -- ``onednn``,
  ``transposed`` (float32), ``linear`` (``F.linear`` on the fused weight), ``compiled`` (float32,
  only when asked: 20-60 s to build), ``int8`` and ``int4`` (bfloat16: reported, never chosen,
  because they change the results by the quantisation error; ``--weights`` asks for them) -- and times one
  decoded token's worth of products (every layer's q/k/v, o, gate/up, down and the LM head, one
  row each) in interleaved rounds, keeping each candidate's median. It also times the same
  products on a chunk of ``CHUNK`` rows (prefill, scoring): the fastest kernel for one row is not
  always the fastest for many (float32 on the EPYC: the transposed layout wins one row, oneDNN a
  chunk by 2.2x). When the chunk's fastest is ``SPLIT_GAIN`` times faster there than the
  token's, a decoded token and a chunk each get their own (``pack_linear``'s ``chunk_kernel``),
  at the cost of a second copy of the weights, as with ``compile``. bfloat16 chunks have one more
  candidate, ``widened`` (the product in float32 on the weight widened for the call): on a CPU
  without native bfloat16 products (AVX2) PyTorch's bfloat16 GEMM is 4-5x slower than float32's.
- ``choose(model)`` returns the cached choice for this CPU, torch version, model, dtype and
  thread count, measuring and caching it on first use. The cache is a small JSON file next to the
  converted weights (``<cache>/models/<name>/kernels.json``) or, for a folder of the user's,
  ``<cache>/kernels/<model identity>.json``; an unreadable cache is measured again.
- ``cached(model)`` reads the choice without measuring (what ``endless info`` shows).

Only the matrix products differ between candidates (attention, norms and the rest of the token
are the same code), so timing them alone isolates what the choice changes.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EAGER = ("onednn", "transposed", "linear")
CHUNK_ONLY = ("widened",)  # timed on chunks only: widening the weight for one row would cost more than the row
VERSION = 4  # of the cache entries; older ones are measured again
CHUNK = 64  # rows of the chunk timing
# a chunk gets its own kernel (a second copy of the weights) only when it is this much faster there
# than the token's kernel: a first measurement split bfloat16 into oneDNN / F.linear for a 7 % chunk
# gain (73.1 against 78.8 ms) and the process held 2.6 GB instead of 1.3
SPLIT_GAIN = 1.25


@dataclass
class Choice:
    """The kernel decoded tokens use on this machine, and the timings it was chosen from."""

    kernel: str  # one of EAGER: a decoded token's products
    chunk_kernel: str  # one of EAGER: a chunk's
    compiled: bool  # float32 one-row products through endless.gemv (only when asked and faster)
    ms: dict[str, float] = field(default_factory=dict)  # candidate -> median ms per token's products
    chunk_ms: dict[str, float] = field(default_factory=dict)  # eager candidate -> median ms per CHUNK rows
    key: str = ""
    measured: str = ""  # UTC time of the measurement
    source: str = "measured"  # or "cache"

    @property
    def name(self) -> str:
        """What runs, e.g. ``onednn``, ``transposed/onednn`` (token/chunk), ``compiled+onednn``."""
        if self.compiled:
            return f"compiled+{self.chunk_kernel}"
        return self.kernel if self.chunk_kernel == self.kernel else f"{self.kernel}/{self.chunk_kernel}"

    def summary(self) -> str:
        """One line: the choice, then every candidate's ms per token's products (and per chunk)."""
        token = ", ".join(f"{k} {v:.2f}" for k, v in self.ms.items())
        chunk = ", ".join(f"{k} {v:.1f}" for k, v in self.chunk_ms.items())
        return f"{self.name} (ms per token: {token}; per {CHUNK}-row chunk: {chunk})"


def cache_key(model) -> str:
    """What a measurement is valid for: CPU (name, family, model, ISA level), torch version, dtype,
    threads, model identity."""
    from endless.bench.timing import machine

    m = machine()
    dtype = str(model.dtype).removeprefix("torch.")
    cpu = f"{m['cpu']} (family {m['cpu_family']} model {m['cpu_model']}, {m['torch_cpu_capability']})"
    return f"{cpu}|torch {torch.__version__}|{dtype}|{torch.get_num_threads()} threads|{model.identity}"


def cache_file(model) -> Path:
    """Next to the converted weights when they are in our cache, else under ``<cache>/kernels``."""
    from endless.models.load import cache_dir

    folder = getattr(model.hf, "endless_folder", None)
    root = cache_dir()
    if folder is not None and root in Path(folder).resolve().parents:
        return Path(folder) / "kernels.json"
    return root / "kernels" / f"{model.identity[:24]}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable kernel cache %s (%s); measuring again", path, e)
        return {}


def cached(model, *, compile: bool = False) -> Choice | None:
    """The choice recorded for this machine and model, or None (nothing measures here)."""
    entry = _read(cache_file(model)).get(cache_key(model))
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        return None
    if compile and "compiled" not in entry.get("ms", {}) and model.dtype == torch.float32:
        return None  # measured without the compiled candidate: measure it now
    try:
        choice = Choice(kernel=entry["kernel"], chunk_kernel=entry["chunk_kernel"],
                        compiled=bool(entry["compiled"] and compile), ms=dict(entry["ms"]),
                        chunk_ms=dict(entry["chunk_ms"]), key=cache_key(model), measured=entry.get("measured", ""),
                        source="cache")
    except (KeyError, TypeError, ValueError):
        return None
    return choice if choice.kernel in EAGER and choice.chunk_kernel in EAGER + CHUNK_ONLY else None


def choose(model, *, compile: bool = False, refresh: bool = False) -> Choice:
    """The fastest kernel for ``model`` (a CPU ``Transformer``) here: cached, else measured and cached.

    ``compile``: the compiled one-row kernels (float32) are a candidate too, used when faster."""
    if not refresh:
        found = cached(model, compile=compile)
        if found is not None:
            return found
    choice = measure(model, compile=compile)
    _store(model, choice)
    return choice


def measure(model, *, compile: bool = False, rounds: int = 15) -> Choice:
    """Time every candidate on ``model`` (module docstring); the fastest eager one (or compiled) wins."""
    from endless.packed import Packed

    if model.device.type != "cpu":
        raise ValueError("kernel choice is for CPU models; on CUDA the modules' own kernels run")
    f32, bf16 = model.dtype == torch.float32, model.dtype == torch.bfloat16
    builds = {"onednn": {"kernel": "onednn"}, "linear": {"kernel": "linear"}}
    if f32:
        builds["transposed"] = {"kernel": "transposed"}
        if compile:
            builds["compiled"] = {"kernel": "default", "compile": True}
    if bf16:
        builds["widened"] = {"kernel": "widened"}
        builds["int8"] = {"weights": "int8"}
        builds["int4"] = {"weights": "int4"}
    packs = {}
    for name, kw in builds.items():
        p = Packed(model.layers, model.lm_head, model._act, **kw)
        # a kernel missing here falls back inside pack_linear: time only what it really is
        if name in EAGER + CHUNK_ONLY and p.kernel != name:
            log.info("kernel %s is not available here (fell back to %s)", name, p.kernel)
            continue
        if name == "compiled" and not p.compiled:
            continue
        packs[name] = p
    first = packs[next(iter(packs))]
    inputs, chunks = _inputs(first, model.dtype, 1), _inputs(first, model.dtype, CHUNK)
    times: dict[str, list[float]] = {name: [] for name in packs if name not in CHUNK_ONLY}
    chunk_times: dict[str, list[float]] = {name: [] for name in packs if name in EAGER + CHUNK_ONLY}
    with torch.inference_mode():
        for p in packs.values():  # warm-up: first calls pay for lazy set-up
            _products(p, inputs)
        for r in range(rounds):  # interleaved, so a load change on the machine hits every candidate
            for name, p in packs.items():
                if name in times:
                    times[name].append(_timed(p, inputs))
                if name in chunk_times and r % 3 == 0:  # a chunk is ~CHUNK/4 tokens' time: fewer rounds
                    chunk_times[name].append(_timed(p, chunks))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    chunk_ms = {name: 1e3 * statistics.median(t) for name, t in chunk_times.items()}
    exact = {k: v for k, v in ms.items() if k in EAGER}
    best = min(exact, key=exact.get)
    compiled = "compiled" in ms and ms["compiled"] < exact[best]
    chunk_best = min(chunk_ms, key=chunk_ms.get)
    if best in chunk_ms and chunk_ms[best] < SPLIT_GAIN * chunk_ms[chunk_best]:
        chunk_best = best  # not worth a second copy of the weights
    return Choice(kernel=best, chunk_kernel=chunk_best, compiled=compiled,
                  ms=dict(sorted(ms.items(), key=lambda kv: kv[1])),
                  chunk_ms=dict(sorted(chunk_ms.items(), key=lambda kv: kv[1])), key=cache_key(model),
                  measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _timed(packed, inputs: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    _products(packed, inputs)
    return time.perf_counter() - t0


def _inputs(packed, dtype: torch.dtype, rows: int) -> list[torch.Tensor]:
    """``rows`` random rows per packed matrix, of its input width."""
    g = torch.Generator().manual_seed(0)
    out: list[torch.Tensor] = []
    for layer in packed.layers:
        width_in = layer._mods[0].weight.shape[1]  # q/k/v and gate/up read the hidden state
        inner = layer._mods[6].weight.shape[1]  # down reads the MLP's width
        attn_in = layer._mods[3].weight.shape[1]  # o reads the heads' outputs
        out += [torch.randn(rows, n, generator=g).to(dtype) for n in (width_in, attn_in, width_in, inner)]
    out.append(torch.randn(rows, packed.lm_head.weight.shape[1], generator=g).to(dtype))
    return out


def _products(packed, inputs: list[torch.Tensor]) -> None:
    for fn, x in zip(packed.linears(), inputs, strict=True):
        fn(x)


def _store(model, choice: Choice) -> None:
    from endless.files import atomic_write

    path = cache_file(model)
    data = _read(path)
    entry = asdict(choice)
    entry.pop("key")
    entry.pop("source")
    entry["version"] = VERSION
    data[choice.key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    except Exception as e:  # a read-only cache costs a measurement per load, nothing else
        log.warning("cannot cache the kernel choice at %s (%s)", path, str(e).splitlines()[0] if str(e) else e)
