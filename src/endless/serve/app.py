"""The HTTP application (FastAPI): OpenAI-compatible routes over one ``Engine``.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true`` answers as
server-sent events, ``data: {chunk}`` lines ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text: tokens/s, live sessions, queue), ``GET /``
(the chat page). With an API key every ``/v1`` route and ``/metrics`` need
``Authorization: Bearer KEY`` (else 401). Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON or fields, 401, 429
when the queue is full. A client that goes away cancels its request and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from endless.serve.engine import Engine, Job, QueueFull
from endless.serve.protocol import (
    BadRequest,
    Limits,
    chat_request,
    completion_logprobs,
    completion_requests,
    error_body,
    new_id,
    now,
    usage,
)

SESSION_HEADER = "x-conversation-id"


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The application serving ``engine``; the engine starts and stops with it."""
    limits = limits or Limits()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="endless", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        path = request.url.path
        if (path.startswith("/v1/") or path == "/metrics") and not authorized(request):
            return _error(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_request_error",
                          code="invalid_api_key")
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > 4 * limits.max_prompt_bytes + 65536:  # JSON escaping can quadruple the text
            raise BadRequest(f"request body of {len(raw)} bytes is too large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("endless.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_name, "policy": engine.policy.spec}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0, "owned_by": "endless"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        c = engine.counts
        rows = [
            ("endless_tokens_per_second", "gauge", "decoded tokens per second over the last 10 s", engine.tokens_per_second()),
            ("endless_live_sessions", "gauge", "conversations held in memory", len(engine.store.live)),
            ("endless_queue_length", "gauge", "requests waiting for a slot", len(engine.waiting)),
            ("endless_running_requests", "gauge", "requests reading or decoding", len(engine.active)),
            ("endless_requests_total", "counter", "requests accepted", c["requests"]),
            ("endless_rejected_total", "counter", "requests refused with 429", c["rejected"]),
            ("endless_generated_tokens_total", "counter", "tokens decoded", c["generated"]),
            ("endless_fed_tokens_total", "counter", "prompt tokens read", c["fed"]),
            ("endless_refed_total", "counter", "conversations re-read from the start (history disagreed)", c["refed"]),
            ("endless_sessions_saved_total", "counter", "session files written", engine.store.saved),
            ("endless_sessions_resumed_total", "counter", "sessions loaded from their files", engine.store.resumed),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v:g}\n" for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def wait(job: Job, request: Request) -> tuple:
        """The job's final event; a client that left cancels it."""
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    return ("error", 499, "client closed the request")
                continue
            if ev[0] != "delta":
                return ev

    def submit(reqs) -> list[Job]:
        jobs = []
        try:
            for r in reqs:
                jobs.append(engine.submit(r))
        except QueueFull:
            for j in jobs:
                engine.cancel(j)
            raise
        return jobs

    async def run(request: Request, kind: str):
        try:
            body = await body_of(request)
            header = request.headers.get(SESSION_HEADER)
            reqs = [chat_request(body, limits, header)] if kind == "chat" else completion_requests(body, limits, header)
            jobs = submit(reqs)
        except BadRequest as e:
            return _error(400, str(e), param=e.param)
        except QueueFull as e:
            return _error(429, str(e), "rate_limit_error", code="queue_full")
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.get("stream"):
            return StreamingResponse(stream_events(jobs[0], rid, kind, body), media_type="text/event-stream",
                                     headers=_headers(jobs[0]))
        results = [await wait(j, request) for j in jobs]
        for ev in results:
            if ev[0] == "error":
                for j in jobs:
                    engine.cancel(j)
                return _error(ev[1], ev[2], "invalid_request_error" if ev[1] == 400 else "server_error")
        done = [ev[1] for ev in results]
        if kind == "chat":
            payload = {
                "id": rid, "object": "chat.completion", "created": now(), "model": engine.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done[0]["text"]},
                             "finish_reason": done[0]["finish_reason"], "logprobs": None}],
                "usage": usage(done[0]),
                "conversation_id": jobs[0].req.session_id,
            }
        else:
            choices = []
            for i, (job, res) in enumerate(zip(jobs, done, strict=True)):
                text = res["text"]
                if job.req.echo:
                    prompt = job.req.prompt
                    text = (prompt if isinstance(prompt, str) else engine.tok.decode(prompt)) + text
                lp = None if job.req.logprobs is None else completion_logprobs(engine.tok, res, job.req.echo)
                choices.append({"index": i, "text": text, "finish_reason": res["finish_reason"], "logprobs": lp})
            total = {k: sum(r[k] for r in done) for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "fed_tokens", "session_tokens")}
            payload = {"id": rid, "object": "text_completion", "created": now(), "model": engine.model_name,
                       "choices": choices, "usage": usage({**total, "refed": False})}
        return JSONResponse(payload, headers=_headers(jobs[0]))

    def _headers(job: Job) -> dict:
        return {SESSION_HEADER: job.req.session_id} if job.req.session_id else {}

    async def stream_events(job: Job, rid: str, kind: str, body: dict):
        created, finished = now(), False
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                d = {} if delta is None else {"content": delta}
                if first:
                    d["role"] = "assistant"
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.model_name,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": engine.model_name,
                    "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}

        try:
            if kind == "chat":
                yield _sse(chunk("", None, first=True))
            elif job.req.echo:
                p = job.req.prompt
                yield _sse(chunk(p if isinstance(p, str) else engine.tok.decode(p), None))
            while True:
                ev = await job.events.get()
                if ev[0] == "delta":
                    yield _sse(chunk(ev[1], None))
                elif ev[0] == "error":
                    finished = True
                    yield _sse(error_body(ev[2], "invalid_request_error" if ev[1] == 400 else "server_error"))
                    break
                else:
                    finished = True
                    yield _sse(chunk(None, ev[1]["finish_reason"]))
                    if include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                    "created": created, "model": engine.model_name, "choices": [], "usage": usage(ev[1])})
                    break
            yield _sse("[DONE]")
        finally:
            if not finished:  # the client went away mid-reply: free the slot
                engine.cancel(job)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    return app


__all__ = ["create_app", "SESSION_HEADER"]
