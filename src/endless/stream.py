"""``Stream``: a language model reading an endless input under one attention policy.

Contract (issue "streaming engine"):

- ``feed(ids)`` takes any number of tokens (a prompt far longer than the window included), runs
  them in chunks of at most ``chunk`` tokens, and returns each token's log-probability given
  everything before it under the policy. Chunked processing is exact: the numbers equal
  feeding the same tokens one at a time (tests/test_stream.py).
- ``generate()`` decodes token by token from the current state.
- Several independent streams advance together with ``batch > 1`` (ids of shape (B, C)).
- Memory is constant for every policy but ``dense``: buffers are allocated at construction.
- ``snapshot()`` / ``restore(snap)`` branch in memory: restoring gives back exactly the state
  (and therefore the log-probs) of the moment of the snapshot.
- ``save(path)`` / ``Stream.load(path, model)`` round-trip the whole state (see
  ``endless.state_io``): resuming gives exactly the log-probs of an uninterrupted stream, on
  the device it was saved on or any other (a file holds host tensors).
- The state lives on the model's device (``device=`` moves the model there); ids may come from
  any device, and the log-probs ``feed`` returns are host tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from endless.policies.spec import Policy, check_fits, parse_policy
from endless.policies.states import make_state
from endless.transformer import Transformer
from endless.validate import BATCH, CHUNK, MAX_NEW_TOKENS, SEED, TEMPERATURE

log = logging.getLogger(__name__)


LOGPROB_ROWS = 16  # rows per block in token_logprobs: (16, V) float32 temporaries, 3 MB at V=49k


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32 for (B, C, V) logits of any float dtype and (B, C)
    targets. Rows go in blocks of ``LOGPROB_ROWS`` so the float32 log-softmax stays a few MB
    (a chunk's whole would be ~25 MB, freshly mapped and page-faulted: costlier than the math)."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for lo in range(0, targets.shape[1], LOGPROB_ROWS):
        # one fused kernel (max, sum of exp, write) instead of logsumexp's four passes: 1.7x
        block = torch.log_softmax(logits[:, lo : lo + LOGPROB_ROWS], dim=-1, dtype=torch.float32)
        out[:, lo : lo + LOGPROB_ROWS] = block.gather(2, targets[:, lo : lo + LOGPROB_ROWS, None])[..., 0]
    return out


def as_transformer(model) -> Transformer:
    return model if isinstance(model, Transformer) else Transformer(model)


class Stream:
    """Streaming state of ``batch`` sequences under ``policy`` over one model."""

    def __init__(
        self,
        model,
        policy: "Policy | str" = "sinks:4+1020",
        *,
        batch: int = 1,
        chunk: int = 128,
        check_context: bool = True,
        device: "str | torch.device | None" = None,
    ) -> None:
        self.model = as_transformer(model)
        if device is not None:  # moves the model: a stream's state lives where its weights do
            self.model.to(device)
        self.batch, self.chunk = BATCH.check(batch), CHUNK.check(chunk)  # before anything is built
        self.policy = parse_policy(policy)
        if check_context:
            check_fits(self.policy, self.model.dims.context)
        self.state = make_state(self.model, self.policy, batch=self.batch, chunk=self.chunk)
        self.last_logits: torch.Tensor | None = None  # (B, V) float32, after the last token fed
        self.fed = 0  # tokens fed by the user (the sink-token prefix excluded)
        self.saved_extra: dict[str, str] = {}

    @property
    def position(self) -> int:
        """Number of tokens this stream has read."""
        return self.fed

    def _start(self) -> None:
        """Before a stream's first token: the policy's prefix (``Policy.prefix``, e.g. the S sink
        copies of ``sinks:S+W,sink=#ID``), read like any tokens; the first real token is then
        predicted from it."""
        prefix = self.policy.prefix()
        if prefix and self.state.t == 0:
            ids = torch.tensor(prefix, dtype=torch.long, device=self.model.device).expand(self.batch, -1)
            self._run(ids, logprobs=False)

    def _as_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None, :]
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"expected ids of shape ({self.batch}, C), got {tuple(ids.shape)}")
        return ids.to(self.model.device)

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, *, logprobs: bool) -> torch.Tensor | None:
        out = [] if logprobs else None
        for lo in range(0, ids.shape[1], self.chunk):
            part = ids[:, lo : lo + self.chunk]
            logits = self.state.forward(part, last_only=not logprobs)  # model dtype
            if logprobs:
                prev = torch.full((self.batch, 1), float("nan"), device=logits.device)
                if self.last_logits is not None:
                    prev = token_logprobs(self.last_logits[:, None], part[:, :1])
                inner = token_logprobs(logits[:, :-1], part[:, 1:])  # token c given <= c-1
                out.append(torch.cat([prev, inner], dim=1))
            self.last_logits = logits[:, -1].float()
        return torch.cat(out, dim=1).cpu() if logprobs else None

    def feed(self, ids, *, logprobs: bool = True) -> torch.Tensor | None:
        """Read ``ids`` ((C,) or (B, C)). Returns (B, C) float32 log-probs of each token given
        the stream before it (NaN for the very first token of a stream), or None with
        ``logprobs=False`` (faster: the LM head runs on the last position only)."""
        ids = self._as_ids(ids)
        if ids.shape[1] == 0:
            raise ValueError("nothing to feed: empty token sequence")
        self._start()
        out = self._run(ids, logprobs=logprobs)
        self.fed += ids.shape[1]
        return out

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Read ``ids`` as ``feed`` does and return their logits (B, C, V) in the model's dtype, on
        its device (what ``endless verify`` compares with its oracles)."""
        ids = self._as_ids(ids)
        self._start()
        out = []
        for lo in range(0, ids.shape[1], self.chunk):
            logits = self.state.forward(ids[:, lo : lo + self.chunk])
            self.last_logits = logits[:, -1].float()
            out.append(logits)
        self.fed += ids.shape[1]
        return torch.cat(out, dim=1)

    def next_token(self, *, temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pick the next token of every stream (B,): greedy, or sampled at ``temperature`` (in [0, 100],
        ``EndlessError`` otherwise: NaN or a negative value would silently mean greedy)."""
        temperature = TEMPERATURE.check(temperature)
        if self.last_logits is None:
            raise ValueError("feed a prompt before generating")
        if temperature <= 0:
            return self.last_logits.argmax(dim=-1)
        probs = torch.softmax(self.last_logits / temperature, dim=-1)
        if generator is None or generator.device.type == "cpu":
            # drawn on the host: one seed gives the same tokens on every device
            return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(probs.device)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def generate(
        self,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: Sequence[int] = (),
    ) -> Iterator[int]:
        """Decode up to ``max_new_tokens`` tokens of a single stream, yielding each token id as
        soon as it is chosen (and fed back). Stops after yielding a token in ``stop``.

        ``max_new_tokens``, ``temperature`` and ``seed`` are checked before the first token (a
        generator body runs on the first ``next``), with the wording of the matching CLI flags."""
        MAX_NEW_TOKENS.check(max_new_tokens)
        TEMPERATURE.check(temperature)
        SEED.check_optional(seed)
        return self._generate(max_new_tokens, temperature=temperature, seed=seed, stop=stop)

    def _generate(self, max_new_tokens: int, *, temperature: float, seed: int | None,
                  stop: Sequence[int]) -> Iterator[int]:
        if self.batch != 1:
            raise ValueError("generate() drives one stream; use next_token() and feed() for batches")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for _ in range(max_new_tokens):
            tok = self.next_token(temperature=temperature, generator=gen)
            self.feed(tok[:, None], logprobs=False)
            yield int(tok[0])
            if int(tok[0]) in stop:
                return

    # -- branching ----------------------------------------------------------------------------

    def snapshot(self, into: dict | None = None) -> dict:
        """An in-memory copy of the whole state; ``restore`` returns the stream to it exactly.
        Used to score several continuations from one point (e.g. the choices of a question).
        ``into``: an earlier snapshot of this stream, updated in place and returned, whose buffers
        are reused when the shapes still match (no allocation: what a long-running probe, such as
        the soak's, needs)."""
        tensors = self.state.state_tensors()
        old = into["tensors"] if into is not None else {}
        if old.keys() == tensors.keys() and all(old[k].shape == v.shape and old[k].dtype == v.dtype
                                                for k, v in tensors.items()):
            for k, v in tensors.items():
                old[k].copy_(v)
            copies = old
        else:
            copies = {k: v.clone() for k, v in tensors.items()}
        snap = into if into is not None else {}
        snap.update(tensors=copies, t=self.state.t, fed=self.fed,
                    last_logits=None if self.last_logits is None else self.last_logits.clone())
        return snap

    def restore(self, snap: dict) -> None:
        """Go back to ``snap`` (from ``snapshot`` of this stream), in place where buffers are fixed."""
        self.state.load_tensors(snap["tensors"], snap["t"])
        self.fed = snap["fed"]
        self.last_logits = None if snap["last_logits"] is None else snap["last_logits"].clone()

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: "str | Path", *, extra: dict[str, str] | None = None) -> None:
        """Write the whole state atomically, with a checksum, model identity and policy;
        ``extra`` strings (e.g. a chat transcript) are stored and checksummed with it and come
        back as ``saved_extra`` on load."""
        from endless.state_io import save_stream

        save_stream(self, Path(path), extra)

    @classmethod
    def load(cls, path: "str | Path", model, *, policy: "Policy | str | None" = None,
             device: "str | torch.device | None" = None) -> "Stream":
        """Restore a saved stream onto ``model`` (moved to ``device`` if given); refuses a
        different model or policy. A stream saved on one device resumes on any other."""
        from endless.state_io import load_stream

        model = as_transformer(model)
        if device is not None:
            model.to(device)
        return load_stream(cls, Path(path), model, policy)
