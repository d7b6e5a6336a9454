"""The OpenAI request bodies, parsed and checked by hand, and the response shapes.

Contract: ``chat_request`` and ``completion_requests`` turn a decoded JSON body into engine
``Request``s or raise ``BadRequest`` with a one-line message naming the field (HTTP 400, in the
OpenAI error shape of ``error_body``). Checked by hand rather than by a schema so that every
message says which field is wrong and why, and unknown fields are ignored, as OpenAI's are.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from endless.serve.engine import Request
from endless.serve.sessions import SESSION_ID

ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Limits:
    """Per-request limits: prompt size in UTF-8 bytes and tokens to generate."""

    max_prompt_bytes: int = 1_000_000
    max_tokens: int = 4096


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, default, low: float, high: float, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return kind(value)


def _common(body: dict, limits: Limits, session_header: str | None) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only 'n': 1 is supported", "n")
    sid = body.get("conversation_id", session_header)
    if sid is not None and (not isinstance(sid, str) or not SESSION_ID.fullmatch(sid)):
        raise BadRequest("'conversation_id' must be 1-128 characters of letters, digits, '_', '-' or '.'",
                         "conversation_id")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}", "seed")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", "stream")
    return dict(
        session_id=sid,
        max_tokens=_number(body, "max_tokens", min(256, limits.max_tokens), 0, limits.max_tokens, int),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=None if seed is None else seed % 2**63,
        stop=stop,
    )


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, list):  # the parts form: only text parts
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string", "messages")
    return content


def chat_request(body: dict, limits: Limits, session_header: str | None = None) -> Request:
    common = _common(body, limits, session_header)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must be an object with a role in {', '.join(ROLES)}", "messages")
        clean.append({"role": m["role"], "content": _content(m, i)})
    if clean[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", "messages")
    size = sum(len(m["content"].encode()) for m in clean)
    if size > limits.max_prompt_bytes:
        raise BadRequest(f"the messages hold {size} bytes, more than this server's limit of {limits.max_prompt_bytes}",
                         "messages")
    if body.get("logprobs") or body.get("echo"):
        raise BadRequest("logprobs and echo are supported on /v1/completions only", "logprobs")
    return Request("chat", messages=clean, **common)


def completion_requests(body: dict, limits: Limits, session_header: str | None = None) -> list[Request]:
    """One request per prompt (``prompt`` may be a string, a list of them, token ids or a list of
    lists of token ids, as lm-evaluation-harness's ``local-completions`` sends)."""
    common = _common(body, limits, session_header)
    common.pop("session_id")  # completions are stateless: every prompt is read from the start
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(t) for t in p)) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                         "prompt")
    for p in prompts:
        size = len(p.encode()) if isinstance(p, str) else 4 * len(p)
        if size > limits.max_prompt_bytes:
            raise BadRequest(f"a prompt holds {size} bytes, more than this server's limit of {limits.max_prompt_bytes}",
                             "prompt")
        if isinstance(p, str) and not p:
            raise BadRequest("empty prompt", "prompt")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20):
        raise BadRequest("'logprobs' must be an integer in [0, 20]", "logprobs")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest("'echo' must be true or false", "echo")
    if body.get("stream") and len(prompts) > 1:
        raise BadRequest("'stream': true takes a single prompt", "stream")
    return [Request("completion", prompt=p, echo=echo, logprobs=logprobs, **common) for p in prompts]


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(result: dict) -> dict:
    """OpenAI's usage block; ``fed_tokens`` (ours) counts the tokens this request actually ran
    through the model, ``prompt_tokens_details.cached_tokens`` those its session had read before."""
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]},
        "fed_tokens": result["fed_tokens"],
        "refed": result["refed"],
        "session_tokens": result["session_tokens"],
    }


def completion_logprobs(tok, result: dict, echo: bool) -> dict:
    """The legacy completions ``logprobs`` block over the echoed prompt (if any) and the reply."""
    rows = (result["prompt_logprobs"] if echo else []) + result["gen_logprobs"]
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    at = 0
    for tok_id, lp, top in rows:
        piece = tok.decode([tok_id])
        tokens.append(piece)
        token_logprobs.append(lp)
        offsets.append(at)
        at += len(piece)
        if lp is None:
            top_logprobs.append(None)
            continue
        table: dict[str, float] = {}
        for i, v in top:  # best first; two ids that decode alike keep the better
            table.setdefault(tok.decode([i]), v)
        top_logprobs.append(table)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


__all__ = ["BadRequest", "Limits", "chat_request", "completion_requests", "error_body", "usage", "completion_logprobs"]
