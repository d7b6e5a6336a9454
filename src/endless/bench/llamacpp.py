"""llama.cpp's decode of the same GGUF at the same context: the speed a CPU user gets today.

Optional: runs only when ``llama-cpp-python`` is importable (``pip install endless-lm[bench]``
does not pull it; see the README for the build flags that work on CPUs where the native build
crashes). Nothing else in the package or the tests depends on it.

Method: load the GGUF with ``n_ctx`` large enough, prefill ``length`` tokens with ``eval`` (timed:
prefill tokens/s), then ``eval`` one token at a time, in the same interleaved rounds as our
decoders (``endless.bench.decode``). llama.cpp keeps a dense cache; it is rewound to ``length``
after each step (``n_tokens``; the next ``eval`` drops what lies beyond), so every step sees the
same length, as for the other implementations. Note the weights: the embedded GGUF is Q4_1
(4.5 bits per weight), 3.6x fewer bytes than bfloat16 and 7x fewer than float32.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppDecoder:
    """llama.cpp holding ``length`` tokens of context, decoding one token per ``step``.

    One ``Llama`` instance is shared by all cache lengths (``reset`` between them)."""

    def __init__(self, llm, ids: list[int], length: int) -> None:
        self.llm, self.ids, self.length = llm, ids, length
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:length])
        self.prefill_tokens_per_s = length / (time.perf_counter() - t)
        self.i = length

    def step(self) -> None:
        self.llm.eval([self.ids[self.i % len(self.ids)]])
        self.i += 1
        self.llm.n_tokens = self.length  # rewind: the next step sees ``length`` cached tokens again

    def state_bytes(self) -> int:
        return 0  # llama.cpp's cache lives outside Python; see the process RSS

    def bytes_per_token(self) -> int:
        """The quantised weights (the GGUF's size) and float16 keys/values of the context."""
        llm = self.llm
        d = llm.metadata
        arch = d.get("general.architecture", "llama")
        layers = int(d.get(f"{arch}.block_count", 0))
        kv_heads = int(d.get(f"{arch}.attention.head_count_kv", 0))
        head_dim = int(d.get(f"{arch}.embedding_length", 0)) // max(1, int(d.get(f"{arch}.attention.head_count", 1)))
        return Path(llm.model_path).stat().st_size + 2 * layers * kv_heads * (self.length + 1) * head_dim * 2


def load_llamacpp(gguf: Path, *, n_ctx: int, threads: int):
    """A ``llama_cpp.Llama`` for ``gguf`` with room for ``n_ctx`` tokens."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 n_batch=512, verbose=False)
