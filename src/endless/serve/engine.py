"""The one worker that owns the model: a bounded queue, prefill in slices, batched decoding.

Contract:

- HTTP handlers only ``submit`` a ``Job`` and read its ``events`` (an asyncio queue of
  ``("delta", text)``, then ``("done", result)`` or ``("error", status, message)``). ``submit``
  raises ``QueueFull`` (HTTP 429) when ``max_batch`` requests run and ``max_queue`` more wait.
- One asyncio task schedules; the model runs in one dedicated thread (so the event loop keeps
  serving while a step computes). Each step reads at most ``prefill_budget`` prompt tokens (a long
  prompt is read in slices between decoding steps, so it does not stall the other replies), then
  decodes one token of every request past its prompt in one forward pass
  (``endless.serve.batch.decode_step``: streams at different positions; the ring states among them
  attend together over one pool of their caches, ``endless.serve.pool``).
- With a compiled decode step (``serve --compile-step``), ``compile_step_now`` builds its graphs
  before serving; a step of one conversation then runs through it when its ring size has one
  (``decode_step``), and nothing compiles later.
- A conversation's requests run one at a time, in arrival order; each feeds only what its
  transcript adds to what the session's stream has read (``endless.serve.sessions``).
- A cancelled job (client gone) leaves at the next step and frees its slot; its session records
  what its stream read, so the client's next request (without the lost reply) is re-fed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from endless.errors import EndlessError
from endless.policies.ring import RingKV
from endless.policies.spec import Policy, PrefixSinks, check_fits
from endless.serve.batch import decode_step
from endless.serve.pool import PoolSet
from endless.serve.sampling import logprob_and_top, pick
from endless.serve.sessions import Session, SessionStore
from endless.stream import Stream

log = logging.getLogger(__name__)

IDLE_SAVE_SECONDS = 1.0  # sessions are saved once the server has been idle this long
COMPLETION_SINKS = 4  # sinks:prefix+W on /v1/completions: no template header, StreamingLLM's 4 sinks


class QueueFull(Exception):
    """Every slot runs and the queue is full (HTTP 429)."""


@dataclass
class Request:
    """What a handler asks for, already checked (``endless.serve.protocol``)."""

    kind: str  # "chat" or "completion"
    session_id: str | None = None
    messages: list[dict] | None = None  # chat
    prompt: "str | list[int] | None" = None  # completion: text or token ids
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None  # completion: top-k per token (0 = only the chosen token's)


@dataclass
class Job:
    req: Request
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    # -- the worker's, from here on --
    phase: str = "new"  # new -> prefill -> decode -> finished
    session: Session | None = None
    transcript: str = ""  # chat: the rendered prompt the stream will have read
    todo: list[int] = field(default_factory=list)  # prompt ids not read yet
    prompt_ids: list[int] = field(default_factory=list)  # completion: for echo
    cached: int = 0  # tokens the stream had read before this request
    fed: int = 0
    refed: bool = False
    gen: list[int] = field(default_factory=list)
    shown: str = ""
    text: str = ""
    finish: str | None = None
    generator: torch.Generator | None = None
    prompt_logprobs: list = field(default_factory=list)  # (token, logprob or None, top) per prompt token
    gen_logprobs: list = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def stream(self) -> Stream:
        return self.session.stream


class Engine:
    """Runs every request on one model; see the module docstring."""

    def __init__(self, model, tokenizer, policy: Policy, *, sessions_dir=None, max_sessions: int = 64,
                 max_batch: int = 16, max_queue: int = 64, chunk: int = 128, prefill_budget: int = 256,
                 model_name: str = "model", kv_pool: bool = True) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise EndlessError("this model's tokenizer has no chat template; endless serve needs one")
        if not hasattr(policy, "resolve") and policy.kind == "recompute":
            raise EndlessError("recompute:W re-runs the window for every token and cannot decode in a batch; "
                               "serve sinks:S+W, sinks:prefix+W, window:W, bswa or fam")
        for name, value, low in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0), ("--max-sessions", max_sessions, 1)):
            if value < low:
                raise EndlessError(f"{name} must be >= {low}, got {value}")
        if max_batch > max_sessions:
            raise EndlessError(f"--max-batch ({max_batch}) cannot exceed --max-sessions ({max_sessions})")
        self.model, self.tok, self.policy = model, tokenizer, policy
        self.model_name = model_name
        self.chunk, self.prefill_budget = chunk, prefill_budget
        self.max_batch, self.max_queue = max_batch, max_queue
        self.store = SessionStore(sessions_dir, max_sessions, self._open_stream, policy.spec)
        # the decoding batch's rings as rows of one tensor per ring size (a pinned prefix's length
        # sets it): one attention call per layer and size (endless.serve.pool)
        self.kv_pool = PoolSet(model, max_batch) if kv_pool else None
        self.stop_ids = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                         if isinstance(t, int) and t >= 0}
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.busy: set[str] = set()  # conversations with a request running
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endless-model")
        self._lock = threading.Lock()  # held by the model thread while it computes
        # metrics
        self.counts = {"requests": 0, "rejected": 0, "generated": 0, "fed": 0, "refed": 0, "errors": 0}
        self.recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens decoded) per step

    def compile_step_now(self) -> list[str]:
        """With a compiled decode step on the model (``Transformer.compile_step``, ``endless.step``):
        build its graphs now, before serving, for the streams a client opens without a system prompt
        of its own (a chat under the template's default header, a completion with StreamingLLM's 4
        sinks: under ``sinks:prefix+W`` their ring sizes differ), then compile no more, so no request
        ever waits 30-90 s for a graph; a conversation whose pinned prefix gives another ring size
        decodes eagerly. Returns the policies compiled. Without a compiled step: nothing, []."""
        step = getattr(self.model, "step", None)
        if step is None:
            return []
        chat_head = self._ids(self._pinned([{"role": "user", "content": "Hello"}]))
        streams = {}
        for sinks in (len(chat_head), COMPLETION_SINKS):
            stream = self._new_stream(sinks)
            streams.setdefault(stream.policy.spec, stream)
        done = []
        for spec, stream in streams.items():
            # a prompt, then one decoded token through the path a served step takes (compiles)
            stream.feed(torch.tensor(chat_head or [0] * COMPLETION_SINKS), logprobs=False)
            decode_step([stream], [int(stream.last_logits.argmax())])
            if step.failed is not None:
                break
            if isinstance(stream.state, RingKV) and step.compiled_for(stream.state):
                done.append(spec)
        step.new_graphs = False
        return done

    # -- the handlers' side -----------------------------------------------------------------

    def submit(self, req: Request) -> Job:
        if len(self.waiting) + len(self.active) >= self.max_batch + self.max_queue:
            self.counts["rejected"] += 1
            raise QueueFull(f"server busy: {len(self.active)} requests running and {len(self.waiting)} queued "
                            f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry later")
        job = Job(req)
        self.waiting.append(job)
        self.counts["requests"] += 1
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the job leaves at the next step."""
        job.cancelled = True
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the model worker stopped", exc_info=task.exception())

    async def close(self) -> None:
        """Stop after the current step and save every session."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await asyncio.get_running_loop().run_in_executor(self._pool, self.store.save_all)
        self._pool.shutdown(wait=True)

    def tokens_per_second(self, seconds: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self.recent if now - t <= seconds]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else seconds
        return sum(n for _, n in recent) / span

    # -- scheduling (event loop) --------------------------------------------------------------

    def _admit(self) -> None:
        kept: deque[Job] = deque()
        while self.waiting:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            sid = job.req.session_id
            if len(self.active) >= self.max_batch or (sid is not None and sid in self.busy):
                kept.append(job)  # in order: a conversation's next request waits for its last
                continue
            if sid is not None:
                self.busy.add(sid)
            self.active.append(job)
        self.waiting = kept

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            self._admit()
            if not self.active:
                self._wake.clear()
                if any(s.dirty for s in self.store.live.values()):
                    # idle for a moment (not between two turns of a busy client): make sessions durable
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=IDLE_SAVE_SECONDS)
                    except asyncio.TimeoutError:
                        await loop.run_in_executor(self._pool, self.store.save_all)
                    continue
                await self._wake.wait()
                continue
            try:
                events = await loop.run_in_executor(self._pool, self._step)
            except Exception as e:  # a bug, not a user error: fail the running requests, keep serving
                log.exception("model step failed")
                events = []
                for job in self.active:
                    self._release(job)
                    events.append((job, ("error", 500, f"internal error: {type(e).__name__}: {e}")))
                    job.phase = "finished"
            for job, ev in events:
                job.events.put_nowait(ev)
            for job in [j for j in self.active if j.phase == "finished"]:
                self.active.remove(job)
                if job.req.session_id is not None:
                    self.busy.discard(job.req.session_id)

    # -- the model thread ---------------------------------------------------------------------

    def _step(self) -> list[tuple[Job, tuple]]:
        with self._lock:
            events: list[tuple[Job, tuple]] = []
            for job in self.active:
                if job.cancelled and job.phase != "finished":
                    self._finish(job, "cancelled", events, send=False)
            for job in self.active:
                if job.phase == "new":
                    try:
                        self._setup(job)
                    except Exception as e:  # this request only: the others go on
                        self._release(job)
                        job.phase = "finished"
                        self.counts["errors"] += 1
                        status, text = (400, str(e)) if isinstance(e, EndlessError) else (500, f"{type(e).__name__}: {e}")
                        events.append((job, ("error", status, text)))
            budget = self.prefill_budget
            for job in self.active:
                if job.phase == "prefill" and budget > 0:
                    budget -= self._prefill(job, budget, events)
            decoding = [j for j in self.active if j.phase == "decode"]
            if decoding:
                self._decode(decoding, events)
            return events

    def _open_stream(self, path) -> Stream:
        stream = Stream.load(path, self.model)
        saved = stream.policy
        if isinstance(self.policy, PrefixSinks):
            if saved.kind != "sinks" or saved.window != self.policy.window or saved.sink_token is not None:
                raise EndlessError(f"{path} holds a {saved.spec} stream, not one of {self.policy.spec}")
        elif saved != self.policy:
            raise EndlessError(f"{path} holds a {saved.spec} stream, not {self.policy.spec}")
        return stream

    def _new_stream(self, sinks: int) -> Stream:
        policy = self.policy
        if isinstance(policy, PrefixSinks):
            try:
                policy = policy.resolve(sinks)
            except EndlessError:
                raise EndlessError(f"the system prompt and chat template header take {sinks} tokens, more than "
                                   f"the window of {policy.spec} allows: shorten the system prompt") from None
            check_fits(policy, self.model.dims.context)
        return Stream(self.model, policy, chunk=self.chunk, check_context=False)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def _pinned(self, messages: list[dict]) -> str:
        """The text every rendering of this conversation starts with: the system prompt and the
        template's header up to the first user message's content (pinned under sinks:prefix+W)."""
        head = []
        for m in messages:
            if m["role"] != "system":
                break
            head.append(m)
        a, b = (self.tok.apply_chat_template(head + [{"role": "user", "content": c}], tokenize=False,
                                             add_generation_prompt=False) for c in ("\x01", "\x02"))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[:n]

    def _setup(self, job: Job) -> None:
        req = job.req
        if req.kind == "chat":
            try:
                text = self.tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # e.g. a template that wants user and assistant to alternate
                raise EndlessError(f"the chat template refuses these messages: {e}") from None
            s = self.store.get(req.session_id) if req.session_id is not None else Session(None)
            s.in_use = True
            job.session = s
            if s.extended_by(text):
                job.todo = self._ids(text[s.chars :])
                job.cached = s.stream.position
            else:
                job.refed = s.stream is not None
                pinned = self._pinned(req.messages)
                if not text.startswith(pinned):
                    pinned = ""
                head = self._ids(pinned)
                # sinks: the pinned head; without one, StreamingLLM's first 4 tokens
                s.stream = self._new_stream(len(head) if pinned else COMPLETION_SINKS)
                job.todo = head + self._ids(text[len(pinned) :])
                self.counts["refed"] += job.refed
            job.transcript = text
        else:
            ids = list(req.prompt) if isinstance(req.prompt, list) else self.tok(req.prompt).input_ids
            if not ids:
                raise EndlessError("empty prompt")
            vocab = self.model.dims.vocab
            if any(not 0 <= i < vocab for i in ids):
                raise EndlessError(f"prompt token ids must be in [0, {vocab})")
            job.session = Session(None, self._new_stream(COMPLETION_SINKS), in_use=True)
            job.todo = ids
            job.prompt_ids = list(ids)
        if req.seed is not None:
            job.generator = torch.Generator().manual_seed(req.seed)
        job.phase = "prefill" if job.todo else "decode"
        if job.phase == "decode":
            self._maybe_done_before_decoding(job)

    def _maybe_done_before_decoding(self, job: Job) -> None:
        if job.req.max_tokens == 0:
            job.finish = "length"

    def _prefill(self, job: Job, budget: int, events) -> int:
        n = min(len(job.todo), budget)
        part, job.todo = job.todo[:n], job.todo[n:]
        stream = job.stream
        want = job.req.echo and job.req.logprobs is not None
        if want:
            before = stream.last_logits
            logits = stream.logits(torch.tensor(part))[0]  # (n, V)
            prev = [before] + [logits[i] for i in range(n - 1)]
            k = job.req.logprobs
            for tok_id, lg in zip(part, prev, strict=True):
                if lg is None:
                    job.prompt_logprobs.append((tok_id, None, []))
                else:
                    lp, top = logprob_and_top(lg, tok_id, k)
                    job.prompt_logprobs.append((tok_id, lp, top))
        else:
            stream.feed(torch.tensor(part), logprobs=False)
        job.fed += n
        self.counts["fed"] += n
        if not job.todo:
            job.phase = "decode"
            self._maybe_done_before_decoding(job)
        return n

    def _decode(self, jobs: list[Job], events) -> None:
        tokens, going = [], []
        for job in jobs:
            if job.finish is not None:  # max_tokens 0: the prompt only
                self._finish(job, job.finish, events)
                continue
            logits = job.stream.last_logits
            tok_id = pick(logits, temperature=job.req.temperature, top_p=job.req.top_p, generator=job.generator)
            if job.req.logprobs is not None:
                job.gen_logprobs.append((tok_id, *logprob_and_top(logits, tok_id, job.req.logprobs)))
            tokens.append(tok_id)
            going.append(job)
        if not going:
            return
        decode_step([j.stream for j in going], tokens, pool=self.kv_pool)  # every chosen token is read, a stop token too
        self.recent.append((time.perf_counter(), len(going)))
        self.counts["generated"] += len(going)
        for job, tok_id in zip(going, tokens, strict=True):
            job.gen.append(tok_id)
            self._emit(job, tok_id, events)

    def _emit(self, job: Job, tok_id: int, events) -> None:
        stops = job.req.stop
        ended = job.req.kind == "chat" and tok_id in self.stop_ids or (
            job.req.kind == "completion" and tok_id == self.tok.eos_token_id)
        shown_ids = job.gen[:-1] if ended else job.gen
        text = self.tok.decode(shown_ids, skip_special_tokens=True)
        reason = "stop" if ended else None
        if stops:
            hits = [text.find(s, max(0, len(job.shown) - len(s))) for s in stops]
            hits = [h for h in hits if h >= 0]
            if hits:
                text, reason = text[: min(hits)], "stop"
        if reason is None and len(job.gen) >= job.req.max_tokens:
            reason = "length"
        job.text = text
        if reason is None:
            if text.endswith("\ufffd"):  # the rest of a multi-byte character is still to come
                return
            # hold back what could be the start of a stop string
            hold = max((len(s) - 1 for s in stops), default=0)
            text = text[: len(text) - hold] if hold else text
        if len(text) > len(job.shown):
            events.append((job, ("delta", text[len(job.shown) :])))
            job.shown = text
        if reason is not None:
            self._finish(job, reason, events)

    def _release(self, job: Job) -> None:
        s = job.session
        if s is not None:
            s.in_use = False
            if s.id is not None and s.stream is not None and job.phase in ("decode", "finished"):
                # what the stream has read: the prompt and every token generated (stop tokens too)
                s.record(job.transcript + self.tok.decode(job.gen, skip_special_tokens=False))
            elif s.id is not None and job.phase == "prefill":
                s.stream = None  # half a prompt read: the next request starts over
                s.chars = 0

    def _finish(self, job: Job, reason: str, events, *, send: bool = True) -> None:
        self._release(job)
        job.phase = "finished"
        job.finish = reason
        if not send:
            return
        s = job.session
        events.append((job, ("done", {
            "text": job.text,
            "finish_reason": reason,
            "prompt_tokens": job.cached + job.fed,
            "cached_tokens": job.cached,
            "fed_tokens": job.fed,
            "completion_tokens": len(job.gen),
            "refed": job.refed,
            "session_tokens": s.stream.position if s and s.stream else 0,
            "prompt_ids": job.prompt_ids,
            "gen_ids": list(job.gen),
            "prompt_logprobs": job.prompt_logprobs,
            "gen_logprobs": job.gen_logprobs,
            "seconds": time.perf_counter() - job.submitted,
        })))


__all__ = ["Engine", "Job", "Request", "QueueFull", "COMPLETION_SINKS"]
