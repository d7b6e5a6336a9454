"""llama.cpp's decode of the same GGUF at the same context: the speed a CPU user gets today.

Optional: runs only when ``llama-cpp-python`` is importable (``pip install endless-lm[bench]``
does not pull it; see the README for the build flags that work on CPUs where the native build
crashes). Nothing else in the package or the tests depends on it.

Method: load the GGUF with ``n_ctx`` large enough, prefill ``length`` tokens with ``eval`` (timed:
prefill tokens/s), then ``eval`` one token at a time, in the same interleaved rounds as our
decoders (``endless.bench.decode``). llama.cpp keeps a dense cache; it is rewound to ``length``
after each step (``n_tokens``; the next ``eval`` drops what lies beyond), so every step sees the
same length, as for the other implementations. Note the weights: the embedded GGUF is Q4_1
(4.5 bits per weight), 3.6x fewer bytes than bfloat16 and 7x fewer than float32. To compare
kernels at equal precision, ``dequantized_gguf`` writes the same GGUF with every tensor
dequantised to F32 or BF16 (exactly the weights transformers loads from it, which ours are),
cached under ``$ENDLESS_CACHE/gguf``.
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


GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16"}


def dequantized_gguf(src: Path, dtype: str) -> Path:
    """``src`` rewritten with its matrices in ``dtype`` (F32/BF16), same metadata; cached."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    from endless.models.load import cache_dir

    target = cache_dir() / "gguf" / f"{src.stem}-{GGUF_TYPES[dtype]}.gguf"
    if target.is_file():
        return target
    qtype = getattr(GGMLQuantizationType, GGUF_TYPES[dtype])
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    writer = GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(1 if qtype == GGMLQuantizationType.F16 else (0 if qtype == GGMLQuantizationType.F32 else 32))
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)  # (rows, cols) in numpy order
        if data.ndim > 1:
            writer.add_tensor(t.name, quantize(data, qtype), raw_dtype=qtype)
        else:  # norms stay float32, as llama.cpp expects
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(target)
    return target


def load_llamacpp(gguf: Path, *, n_ctx: int, threads: int):
    """A ``llama_cpp.Llama`` for ``gguf`` with room for ``n_ctx`` tokens."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 n_batch=512, verbose=False)
