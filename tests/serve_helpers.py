"""A server on 127.0.0.1 in a background thread, for the tests and the load benchmark."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time


def smollm2_tokenizer():
    """The embedded SmolLM2's tokenizer (its chat template included), without loading weights."""
    from transformers import AutoTokenizer

    from endless.models.load import resolve

    os.environ.setdefault("ENDLESS_CACHE", os.path.expanduser("~/.cache/endless"))
    return AutoTokenizer.from_pretrained(resolve("smollm2-135m"))


def tiny_chat_model(vocab: int = 49152, context: int = 4096, seed: int = 0):
    """A random 2-layer llama with SmolLM2's vocabulary: fast, and the real tokenizer fits it."""
    from endless.models.tiny import tiny_model
    from endless.stream import as_transformer

    return as_transformer(tiny_model("llama", seed=seed, vocab_size=vocab, max_position_embeddings=context))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, port: int | None = None):
    """Serve ``app`` on 127.0.0.1 while the block runs; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def decode_alone_and_batched(alone, batched, pool, steps: int = 1) -> float:
    """``steps`` greedy tokens: each stream of ``alone`` fed on its own, the same tokens to
    ``batched`` in one ``decode_step`` with ``pool``; returns the largest |log-prob difference|
    of the next-token distributions after the last step."""
    import torch

    from endless.serve.batch import decode_step

    for _ in range(steps):
        tokens = [int(s.next_token()) for s in alone]
        for s, t in zip(alone, tokens, strict=True):
            s.feed(torch.tensor([t]), logprobs=False)
        decode_step(batched, tokens, pool=pool)
    want = torch.cat([torch.log_softmax(s.last_logits.float(), -1) for s in alone])
    got = torch.log_softmax(torch.cat([s.last_logits.float() for s in batched]), -1)
    return (got - want).abs().max().item()
