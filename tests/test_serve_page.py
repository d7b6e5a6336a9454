"""The chat page at / in headless Chromium: two streamed turns of one kept conversation.

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages ending in a NUL byte on file descriptors 3 and 4), so nothing beyond the browser is
needed. Skipped where no Chromium is installed (Debian: ``apt-get install chromium-headless-shell``
or ``chromium``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("fastapi")

from serve_helpers import running, smollm2_tokenizer, tiny_chat_model  # noqa: E402

from endless.policies.spec import parse_policy  # noqa: E402
from endless.serve.app import create_app  # noqa: E402
from endless.serve.engine import Engine  # noqa: E402

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
if BROWSER is None and os.path.isfile("/usr/lib/chromium/chromium-headless-shell"):
    BROWSER = "/usr/lib/chromium/chromium-headless-shell"

pytestmark = [pytest.mark.real, pytest.mark.slow,
              pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")]


class Browser:
    """A headless Chromium and one page, spoken to over the DevTools pipe."""

    def __init__(self, profile) -> None:
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds():  # the protocol's fixed descriptors: 3 reads commands, 4 writes replies
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._n = 0
        self._buf = b""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._n += 1
        msg = {"id": self._n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._n:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      self.session)
        if "exceptionDetails" in r:
            raise RuntimeError(str(r["exceptionDetails"]))
        return r["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, self.session)
        self.until("document.readyState === 'complete' && !!document.getElementById('form')")

    def until(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def test_page_streams_replies_and_keeps_the_conversation(tmp_path):
    engine = Engine(tiny_chat_model(), smollm2_tokenizer(), parse_policy("sinks:prefix+64"), model_name="tiny")
    with running(create_app(engine)) as url:
        b = Browser(tmp_path / "profile")
        try:
            b.goto(url + "/")
            send = ("(t) => { document.getElementById('input').value = t; "
                    "document.getElementById('form').requestSubmit(); }")
            b.js(f"({send})('Hello from the browser')")
            b.until("!document.getElementById('send').disabled && document.querySelectorAll('.assistant').length == 1 "
                    "&& document.querySelector('.assistant').textContent.length > 0")
            first = b.js("document.querySelector('.assistant').textContent")
            cid = b.js("JSON.parse(localStorage.getItem('endless.chat')).id")
            assert cid in engine.store.live and engine.store.live[cid].stream.position > 0
            # a reload keeps the conversation (localStorage); the next turn feeds only what is new
            b.goto(url + "/")
            assert b.js("document.querySelectorAll('.msg').length") == 2
            assert b.js("document.querySelector('.assistant').textContent") == first
            b.js(f"({send})('And again')")
            status = b.until("!document.getElementById('send').disabled && "
                             "document.querySelectorAll('.assistant').length == 2 && "
                             "document.getElementById('status').textContent.includes('fed') && "
                             "document.getElementById('status').textContent")
            fed = int(status.split("fed ")[1].split()[0])
            assert 0 < fed < 20, status  # the new message and its headers, not the history
            assert engine.counts["refed"] == 0
            assert b.js("JSON.parse(localStorage.getItem('endless.chat')).messages.length") == 4
        finally:
            b.close()
