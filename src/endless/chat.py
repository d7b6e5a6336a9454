"""A multi-turn conversation on one endless stream (``endless chat``).

Each turn feeds only what is new since the last turn (the user's message and the assistant
header, rendered by the model's chat template) into the same ``Stream``, then decodes the reply
token by token. Under ``sinks`` the conversation never runs out of context -- but what has left
the window is forgotten: the model cannot recall an evicted turn (docs/methods.md section 2, "What it
is not"). A FAM checkpoint is the answer for real long memory.

The session (stream state + messages) is saved after every turn and resumed on the next start.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from endless.errors import EndlessError
from endless.stream import Stream


class Chat:
    """A conversation held in ``stream``; ``messages`` is the transcript (for the template)."""

    def __init__(self, stream: Stream, tokenizer, *, system: str | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise EndlessError("this model's tokenizer has no chat template; use `endless generate`")
        self.stream = stream
        self.tok = tokenizer
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.rendered = ""  # the transcript as fed so far

    def _render(self, messages: list[dict[str, str]], prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def _new_text(self, user: str) -> str:
        full = self._render(self.messages + [{"role": "user", "content": user}], prompt=True)
        if full.startswith(self.rendered):
            return full[len(self.rendered) :]
        # Templates that re-render history differently: feed this turn on its own.
        return self._render([{"role": "user", "content": user}], prompt=True)

    def turn(self, user: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
             seed: int | None = None) -> Iterator[str]:
        """Feed the user's message and yield the reply as text pieces while it is generated."""
        if not user.strip():
            raise EndlessError("empty message")
        new = self._new_text(user)
        ids = self.tok(new, add_special_tokens=False, return_tensors="pt").input_ids[0]
        self.stream.feed(ids, logprobs=False)
        stop = {t for t in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int) and t >= 0}
        out: list[int] = []
        shown = ""
        for tok in self.stream.generate(max_new_tokens, temperature=temperature, seed=seed, stop=tuple(stop)):
            out.append(tok)
            if tok in stop:
                break
            text = self.tok.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown) :]
                shown = text
        reply = self.tok.decode([t for t in out if t not in stop], skip_special_tokens=True)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        # Exactly what the stream has read, so the next turn feeds only the difference.
        self.rendered += new + self.tok.decode(out, skip_special_tokens=False)

    # -- sessions -----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Stream state and transcript in one atomic, checksummed file."""
        self.stream.save(path, extra={"messages": json.dumps(self.messages), "rendered": self.rendered})

    @classmethod
    def resume(cls, path: Path, model, tokenizer, policy) -> "Chat":
        stream = Stream.load(path, model, policy=policy)
        chat = cls(stream, tokenizer)
        extra = stream.saved_extra
        if "messages" not in extra:
            raise EndlessError(f"{path} is a saved stream, not a chat session")
        chat.messages = json.loads(extra["messages"])
        chat.rendered = extra["rendered"]
        return chat


__all__ = ["Chat"]
