"""`endless serve` with and without --compile-step: one conversation's decode speed, in one run.

Starts two servers on 127.0.0.1 (the same flags, one with --compile-step), then holds one
conversation with each for --turns turns, alternating turn by turn so the two never compute at once
(each server's --threads torch threads; the machine's load hits both alike). The user messages
carry no system prompt, so the chat template's default header is pinned (the ring size
``serve --compile-step`` compiles at startup). Per turn: the decode rate (completion tokens after
the first, over the time from the first streamed token to the last) and the reply text; the two
servers' replies must agree (greedy; bfloat16 may part at a near-tie, which is reported).

    python benchmarks/serve/scripts/compile_step_ab.py --threads 1 --json benchmarks/serve/results/compile_step_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import cpu_model, free_port  # noqa: E402


def start(flags: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "endless.cli.main", "serve", *flags, "--port", str(port)]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True), f"http://127.0.0.1:{port}", cmd


def wait(server: subprocess.Popen, url: str, seconds: float = 900) -> float:
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return time.time() - t0
        except OSError:
            if server.poll() is not None or time.time() > t0 + seconds:
                raise RuntimeError("a server did not start: " + (server.stderr.read() if server.poll() is not None else "timeout")) from None
            time.sleep(0.5)


def turn(client, msgs: list[dict], cid: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, text = [], []
    for chunk in client.chat.completions.create(model="m", messages=msgs, max_tokens=max_tokens, temperature=0,
                                                stream=True, extra_body={"conversation_id": cid}):
        for c in chunk.choices:
            if c.delta.content:
                stamps.append(time.perf_counter())
                text.append(c.delta.content)
    n = len(stamps)
    return {"text": "".join(text), "pieces": n, "seconds": time.perf_counter() - t0,
            "decode_tokens_per_second": (n - 1) / (stamps[-1] - stamps[0]) if n > 2 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--policy", default="sinks:prefix+1020")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import openai

    base = ["--threads", str(args.threads), "--dtype", args.dtype, "--policy", args.policy]
    servers = {name: start(base + extra) for name, extra in (("eager", []), ("compiled", ["--compile-step"]))}
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "dtype": args.dtype,
              "policy": args.policy, "commands": {k: " ".join(v[2][1:]) for k, v in servers.items()}, "turns": []}
    try:
        result["startup_seconds"] = {k: wait(p, url) for k, (p, url, _) in servers.items()}
        clients = {k: openai.OpenAI(base_url=url + "/v1", api_key="ab", max_retries=0, timeout=900)
                   for k, (_, url, _) in servers.items()}
        msgs = {k: [] for k in servers}
        for t in range(args.turns):
            row = {}
            for k in servers:
                msgs[k].append({"role": "user", "content": f"Tell me a long story about the sea, part {t + 1}."})
                r = turn(clients[k], msgs[k], f"ab-{k}", args.max_tokens)
                msgs[k].append({"role": "assistant", "content": r["text"]})
                row[k] = r
            row["same_text"] = row["eager"]["text"] == row["compiled"]["text"]
            print(f"turn {t}: eager {row['eager']['decode_tokens_per_second']:.1f} tok/s, compiled "
                  f"{row['compiled']['decode_tokens_per_second']:.1f} tok/s, same text {row['same_text']}", flush=True)
            result["turns"].append(row)
    finally:
        for p, _, _ in servers.values():
            p.terminate()
            p.wait(timeout=300)
    rates = {k: [r[k]["decode_tokens_per_second"] for r in result["turns"] if r[k]["decode_tokens_per_second"]]
             for k in servers}
    result["median_decode_tokens_per_second"] = {k: statistics.median(v) for k, v in rates.items()}
    result["compiled_over_eager"] = statistics.median(c / e for c, e in zip(rates["compiled"], rates["eager"], strict=True))
    print(json.dumps({k: result[k] for k in ("startup_seconds", "median_decode_tokens_per_second", "compiled_over_eager")}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
