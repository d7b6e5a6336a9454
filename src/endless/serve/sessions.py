"""Conversations: a conversation id maps to a live ``Stream``; an LRU bounds the live ones and a
folder keeps the rest.

Contract:

- A session records what its stream has read as a character count and a sha256 of that text
  (constant memory however long the conversation). A new request's rendered transcript either
  extends it (then only the new characters are fed) or disagrees (then the stream is rebuilt and
  the whole transcript re-fed): a reply is never computed from a state that is not the
  client's history.
- With a folder, a session is saved there (``<id>.st``, the stream file of ``endless.state_io``:
  atomic, checksummed, with the resolved policy and the record above) when it leaves memory, when
  the server is idle and at shut-down, and is loaded back on its next request, also after a
  restart. A file that is damaged, from another model or under another policy is not resumed:
  the transcript is re-fed instead.
- Only the one worker that owns the model calls this module (no locks).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from endless.errors import EndlessError
from endless.stream import Stream

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Session:
    """A conversation's stream and the record of what it has read."""

    id: str | None  # None: a one-off request, never kept
    stream: Stream | None = None  # None until the first prompt is read
    chars: int = 0  # characters of the rendered transcript the stream has read
    digest: str = text_digest("")
    in_use: bool = False
    dirty: bool = False  # read more since it was last saved

    def extended_by(self, text: str) -> bool:
        """Whether ``text`` starts with exactly what the stream has read."""
        return self.stream is not None and len(text) >= self.chars and text_digest(text[: self.chars]) == self.digest

    def record(self, text: str) -> None:
        self.chars, self.digest, self.dirty = len(text), text_digest(text), True


class SessionStore:
    """Live sessions (at most ``max_live`` in memory, least recently used leave first) over an
    optional folder. ``open_stream(path)`` loads a saved stream onto the server's model and policy
    (raising EndlessError when it does not fit)."""

    def __init__(self, folder: Path | None, max_live: int, open_stream: Callable[[Path], Stream], policy_spec: str) -> None:
        if max_live < 1:
            raise EndlessError(f"--max-sessions must be >= 1, got {max_live}")
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.max_live = max_live
        self.open_stream = open_stream
        self.policy_spec = policy_spec  # the server's policy as given (sinks:prefix+W before resolution)
        self.live: OrderedDict[str, Session] = OrderedDict()
        self.saved = 0
        self.resumed = 0

    def path(self, sid: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{sid}.st"

    def get(self, sid: str) -> Session:
        """The session ``sid``: live, else resumed from the folder, else new (empty)."""
        s = self.live.get(sid)
        if s is None:
            s = self._resume(sid) or Session(sid)
            self.live[sid] = s
        self.live.move_to_end(sid)
        self._evict()
        return s

    def _resume(self, sid: str) -> Session | None:
        if self.folder is None or not self.path(sid).is_file():
            return None
        try:
            stream = self.open_stream(self.path(sid))
            extra = stream.saved_extra
            if extra.get("serve.policy") != self.policy_spec:
                raise EndlessError(f"saved under {extra.get('serve.policy')}, the server runs {self.policy_spec}")
            s = Session(sid, stream, int(extra["serve.chars"]), extra["serve.digest"])
        except (EndlessError, KeyError, ValueError) as e:
            log.warning("session %s not resumed (%s); its transcript will be re-fed", sid, e)
            return None
        self.resumed += 1
        return s

    def _evict(self) -> None:
        for sid in list(self.live):
            if len(self.live) <= self.max_live:
                break
            s = self.live[sid]
            if s.in_use:
                continue
            self.save(s)
            del self.live[sid]

    def save(self, s: Session) -> None:
        """Write a session that read something since its last save (a no-op without a folder)."""
        if self.folder is None or s.id is None or s.stream is None or not s.dirty:
            return
        s.stream.save(self.path(s.id), extra={"serve.policy": self.policy_spec, "serve.chars": str(s.chars),
                                              "serve.digest": s.digest})
        s.dirty = False
        self.saved += 1

    def save_all(self) -> None:
        for s in list(self.live.values()):
            if not s.in_use:
                self.save(s)


__all__ = ["Session", "SessionStore", "SESSION_ID", "text_digest"]
