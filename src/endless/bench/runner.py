"""``run_bench(config)``: every measurement of ``endless bench`` in one run, as one JSON-able dict.

Order per dtype: decode cells at each cache length (ours, transformers, recompute and, when
installed, llama.cpp, interleaved), the stream-position sweep, streaming-perplexity throughput,
then the isolated peak-RSS processes. The copy bandwidth is measured first. ``report.targets``
turns the result into the issue's pass/fail lines; nothing here prints (the CLI does).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers.utils import logging as hf_logging

from endless.bench import llamacpp
from endless.bench.bandwidth import bandwidth
from endless.bench.decode import OursDecoder, decode_cell, weight_bytes
from endless.bench.memory import measure
from endless.bench.positions import position_sweep
from endless.bench.ppl import ppl_throughput
from endless.bench.report import INT4, INT8, UNCOMPILED
from endless.bench.timing import machine
from endless.kernels import CHUNK
from endless.models import load
from endless.stream import Stream
from endless.transformer import Transformer

log = logging.getLogger(__name__)
SCHEMA = "endless-bench/1"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. The defaults are the full run committed under ``benchmarks/``."""

    model: str = "smollm2-135m"
    device: str = "auto"  # on CUDA: no CPU kernels (packing, compiling), llama.cpp or per-process RSS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    threads: int = 1
    pack: bool = True
    compile: bool = True  # float32: compiled one-token kernels (endless.gemv), timed against the uncompiled path
    compile_step: bool = False  # "sinks" decodes through one compiled graph per token (endless.step), beside the eager path
    weights: str = "auto"  # int8 / int4 / int8,int4: bfloat16 sinks with those weights timed beside bfloat16's (issue 21)
    chunk: int = 128
    caches: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    rounds: int = 48
    recompute_steps: int = 4
    positions: tuple[int, ...] = (1024, 4096, 16384, 65536)
    position_window: int = 1020
    position_rounds: int = 48
    ppl_tokens: int = 2048
    ppl_policy: str = "sinks:4+1020"
    with_hf: bool = True
    with_llamacpp: bool = True
    isolated_memory: bool = True
    memory_steps: int = 8
    seed: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


QUICK = BenchConfig(  # about a minute on one loaded core
    dtypes=("float32",), caches=(256, 512), rounds=8, recompute_steps=1, positions=(512, 1536),
    position_window=252, position_rounds=8, ppl_tokens=128, ppl_policy="sinks:4+60",
    with_llamacpp=False, isolated_memory=False, compile=False,
)


def token_ids(tokenizer, vocab: int, n: int, seed: int) -> torch.Tensor:
    """``n`` token ids of the default long text (KJV), or random ids when there is no tokenizer."""
    if tokenizer is None:
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    from endless.data.texts import default_text_path, read_text

    text = read_text(default_text_path())
    ids: list[int] = []
    chars = 5 * n
    while len(ids) < n and chars < 4 * len(text):
        ids = tokenizer(text[:chars]).input_ids
        chars *= 2
    ids = ids[:n]
    return torch.tensor(ids if len(ids) == n else (ids * (n // max(1, len(ids)) + 1))[:n], dtype=torch.long)


def _gguf_for(name: str):
    from pathlib import Path

    if name.endswith(".gguf"):
        return Path(name)
    from endless.models.load import EMBEDDED, _embedded_gguf

    return _embedded_gguf(name) if name in EMBEDDED else None


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict:
    """Every figure of the benchmark (see the module docstring) for ``config``."""
    from tqdm import tqdm

    from endless.device import describe, resolve_device

    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if device.type != "cpu":  # CPU-only parts: packed/compiled kernels, llama.cpp, per-process RSS
        config = dataclasses.replace(config, pack=False, compile=False, compile_step=False, with_llamacpp=False,
                                     isolated_memory=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    hf_logging.disable_progress_bar()
    started = time.time()
    result: dict = {"schema": SCHEMA, "config": dataclasses.asdict(config), "machine": machine(), "runs": {}}
    result["machine"]["device"] = describe(device)
    result["bandwidth"] = bandwidth()
    need = max(max(config.caches) + config.rounds + 64, config.ppl_tokens, max(config.positions) + 2 * config.position_rounds + 2048)
    gguf = _gguf_for(config.model) if config.with_llamacpp and llamacpp.available() else None
    cpp_dtype = "bfloat16" if "bfloat16" in config.dtypes else config.dtypes[-1]
    for dtype in config.dtypes:
        hf, tok = load(config.model, dtype=dtype, device=device)
        step = config.compile_step and config.pack  # the compiled step replaces the compiled products
        compile = config.compile and config.pack and dtype == "float32" and not step  # bfloat16: oneDNN is faster (endless.gemv)
        t0 = time.perf_counter()
        model = Transformer(hf, pack=config.pack, compile=compile)
        if step:  # compiles at each ring size's first token, outside the timed steps (decode_cell warms up)
            model.compile_step()
        ids = token_ids(tok, hf.config.vocab_size, need, config.seed)
        run: dict = {"weight_bytes": weight_bytes(model), "packed_bytes": model.packed.nbytes if model.packed else 0,
                     "compiled_matrices": model.packed.compiled if model.packed else 0, "compiled_step": step,
                     "pack_seconds": time.perf_counter() - t0}
        if model.kernel_choice is not None:  # what this CPU's measurement chose (issue 21, part 1)
            c = model.kernel_choice
            run["kernel"] = {"name": c.name, "source": c.source, "ms_per_token": c.ms, "ms_per_chunk": c.chunk_ms,
                             "chunk_rows": CHUNK, "summary": c.summary()}
        extra = {}
        if run["compiled_matrices"] or step:
            eager = Transformer(hf, pack=True)
            extra[UNCOMPILED] = lambda length, m=eager, ids_=ids: OursDecoder(m, f"sinks:4+{length - 4}", ids_, length)
        for quant, label in (("int8", INT8), ("int4", INT4)):
            if quant in config.weights.split(",") and config.pack and dtype == "bfloat16":
                q = Transformer(hf, weights=quant)
                if step:  # compared with the compiled bfloat16 path, so compiled too
                    q.compile_step()
                run[f"{quant}_packed_bytes"] = q.packed.nbytes
                extra[label] = lambda length, m=q, ids_=ids: OursDecoder(m, f"sinks:4+{length - 4}", ids_, length)
        if gguf is not None:
            # llama.cpp on the same weights in this dtype and, once, on the shipped Q4_1 file.
            files = {"llama.cpp": llamacpp.dequantized_gguf(gguf, dtype)}
            if dtype == cpp_dtype:
                files["llama.cpp Q4_1"] = gguf
            id_list = ids.tolist()
            for name, path in files.items():
                llm = llamacpp.load_llamacpp(path, n_ctx=max(config.caches) + 64, threads=config.threads)
                extra[name] = lambda length, llm=llm, ids_=id_list: llamacpp.LlamaCppDecoder(llm, ids_, length)
            run["llamacpp_files"] = {name: str(path) for name, path in files.items()}
        run["decode"] = []
        for length in tqdm(config.caches, desc=f"decode {dtype}", disable=not progress):
            run["decode"].append(decode_cell(
                hf, model, ids, length, rounds=config.rounds, recompute_steps=config.recompute_steps,
                with_hf=config.with_hf, extra=extra, sync=sync,
            ))
        extra.clear()
        eager = q = None
        gc.collect()
        if step:  # compile the sweep's and the perplexity's ring sizes before anything of theirs is timed
            for policy in (f"sinks:4+{config.position_window}", config.ppl_policy):
                Stream(model, policy, chunk=config.chunk).feed(ids[:1], logprobs=False)
        with tqdm(total=max(config.positions), desc=f"positions {dtype}", disable=not progress) as bar:
            run["positions"] = position_sweep(model, ids, list(config.positions), rounds=config.position_rounds,
                                              window=config.position_window, chunk=config.chunk, progress=bar,
                                              sync=sync)
        gc.collect()
        with tqdm(total=config.ppl_tokens, desc=f"perplexity {dtype}", disable=not progress) as bar:
            run["ppl"] = ppl_throughput(model, ids[: config.ppl_tokens], policy=config.ppl_policy,
                                        chunk=config.chunk, progress=bar)
        del model, hf
        gc.collect()
        if config.isolated_memory:
            impls = ["sinks", "dense", "recompute"] + (["transformers"] if config.with_hf else [])
            cells = [(i, c) for c in config.caches for i in impls]
            run["memory"] = [
                measure({"model": config.model, "dtype": dtype, "impl": i, "cache": c, "threads": config.threads,
                         "steps": config.memory_steps if i != "recompute" else 1, "pack": config.pack})
                for i, c in tqdm(cells, desc=f"memory {dtype}", disable=not progress)
            ]
        result["runs"][dtype] = run
    result["machine"]["load_average_end"] = machine()["load_average"]
    result["seconds"] = time.time() - started
    return result
