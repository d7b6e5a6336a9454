"""Bounded load test of `endless serve` on loopback: N concurrent conversations x T turns.

Starts `endless serve` (a subprocess, 127.0.0.1, a free port), then for each N in --sessions runs N
conversations concurrently, each T turns in a row through the openai client (streamed, so the
time to the first token is measured too). Every turn must succeed; a session is sound when every
later turn continues its stream exactly (``refed`` false, ``cached_tokens`` equal to the stream's
position after the previous turn) and its file verifies after shut-down. Reports p50/p95 turn
latency and generated tokens per second per N, and the engine alone: one batched decoding step of
N streams against one stream (``endless.serve.batch.decode_step``), as JSON.

    python benchmarks/serve/scripts/load.py --threads 1 --json benchmarks/serve/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPICS = ["the sea", "a lighthouse", "bread", "a comet", "winter", "a violin", "rivers", "the moon",
          "a garden", "trains", "owls", "a library", "rain", "mountains", "a clock", "bees"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def conversation(client, cid: str, topic: str, turns: int, max_tokens: int, rows: list, problems: list) -> None:
    msgs = [{"role": "system", "content": "You are a storyteller. Answer at length."}]
    position = None
    for turn in range(turns):
        msgs.append({"role": "user", "content": f"Tell me more about {topic}, part {turn + 1}."})
        t0 = time.perf_counter()
        first = None
        text = []
        usage = None
        try:
            stream = await client.chat.completions.create(
                model="m", messages=msgs, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"conversation_id": cid})
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    if c.delta.content:
                        first = first or time.perf_counter()
                        text.append(c.delta.content)
        except Exception as e:
            problems.append(f"{cid} turn {turn}: {type(e).__name__}: {e}")
            return
        t1 = time.perf_counter()
        if usage is None:
            problems.append(f"{cid} turn {turn}: no usage")
            return
        if turn and (usage.refed or usage.prompt_tokens_details.cached_tokens != position):
            problems.append(f"{cid} turn {turn}: stream not continued (refed {usage.refed}, cached "
                            f"{usage.prompt_tokens_details.cached_tokens} != {position})")
        position = usage.session_tokens
        rows.append({"conversation": cid, "turn": turn, "seconds": t1 - t0,
                     "first_token_seconds": (first or t1) - t0, "completion_tokens": usage.completion_tokens,
                     "fed_tokens": usage.fed_tokens})
        msgs.append({"role": "assistant", "content": "".join(text)})


async def level(url: str, n: int, turns: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    rows, problems = [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(client, f"load-{n}-{i}", TOPICS[i % len(TOPICS)], turns, max_tokens, rows, problems)
                           for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    lat = [r["seconds"] for r in rows]
    ttft = [r["first_token_seconds"] for r in rows]
    gen = sum(r["completion_tokens"] for r in rows)
    return {
        "sessions": n, "turns": turns, "max_tokens": max_tokens, "turns_done": len(rows), "turns_expected": n * turns,
        "problems": problems, "wall_seconds": wall, "generated_tokens": gen, "tokens_per_second": gen / wall,
        "latency_p50": pct(lat, 0.5), "latency_p95": pct(lat, 0.95),
        "first_token_p50": pct(ttft, 0.5), "first_token_p95": pct(ttft, 0.95),
        "mean_completion_tokens": statistics.mean(r["completion_tokens"] for r in rows) if rows else 0,
    }


def engine_alone(threads: int, dtype: str, sizes: list[int], steps: int = 24) -> dict:
    """Tokens/s of one batched decoding step of K streams (each at its own position) vs one
    stream: young streams (64-620 tokens read, as the load test's conversations) and streams past
    the window (every slot of the ring in use: the steady state of a long conversation). Each K is
    timed with the pooled attention (``endless.serve.pool``, what the server runs) and without it
    (each stream's attention on its own), in alternating rounds of ``steps // 4``."""
    import torch

    from endless.cli.common import inference_model
    from endless.models import load
    from endless.serve.batch import decode_step
    from endless.serve.pool import PoolSet
    from endless.stream import Stream

    torch.set_num_threads(threads)
    hf, _ = load("smollm2-135m", dtype=dtype)
    model = inference_model(hf)
    out = {}
    for age, base in (("young", 64), ("past_window", 1160)):
        out[age] = {}
        for k in sizes:
            streams = []
            for i in range(k):
                s = Stream(model, "sinks:4+1020")
                s.feed(torch.randint(0, 49152, (base + 37 * i,)), logprobs=False)
                streams.append(s)
            pool = PoolSet(model, k)
            spent = {"pooled": 0.0, "unpooled": 0.0}
            for mode in ("pooled", "unpooled"):  # warm-up (and the pool's placement) outside the timing
                decode_step(streams, [int(s.next_token()) for s in streams], pool=pool if mode == "pooled" else None)
            for _ in range(4):
                for mode in ("pooled", "unpooled"):
                    t0 = time.perf_counter()
                    for _ in range(steps // 4):
                        tokens = [int(s.next_token()) for s in streams]
                        decode_step(streams, tokens, pool=pool if mode == "pooled" else None)
                    spent[mode] += time.perf_counter() - t0
            n = 4 * (steps // 4)
            out[age][str(k)] = {"step_ms": 1000 * spent["pooled"] / n, "tokens_per_second": k * n / spent["pooled"],
                                "unpooled_step_ms": 1000 * spent["unpooled"] / n,
                                "unpooled_tokens_per_second": k * n / spent["unpooled"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,4,16")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--policy", default="sinks:prefix+1020")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--engine-only", action="store_true", help="time the engine alone, no server")
    ap.add_argument("--http-only", action="store_true", help="skip the engine-alone timing")
    ap.add_argument("--no-kv-pool", action="store_true", help="serve with --no-kv-pool (per-conversation attention)")
    args = ap.parse_args()
    levels = [int(x) for x in args.sessions.split(",")]
    if args.engine_only:
        print(json.dumps(engine_alone(args.threads, args.dtype, levels), indent=1))
        return 0
    port = free_port()
    sessions_dir = Path(tempfile.mkdtemp(prefix="endless-serve-bench-"))
    cmd = [sys.executable, "-m", "endless.cli.main", "serve", "--threads", str(args.threads), "--dtype", args.dtype,
           "--policy", args.policy, "--port", str(port), "--max-batch", str(max(levels)),
           "--max-sessions", str(max(64, 2 * sum(levels))), "--sessions", str(sessions_dir)]
    if args.no_kv_pool:
        cmd.append("--no-kv-pool")
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    result = {"command": " ".join(cmd[1:]), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
              "dtype": args.dtype, "policy": args.policy, "levels": []}
    try:
        import urllib.request

        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not start: " + (server.stderr.read() if server.poll() is not None else "timeout")) from None
                time.sleep(0.5)
        for n in levels:
            r = asyncio.run(level(url, n, args.turns, args.max_tokens))
            print(f"{n:3d} sessions: {r['turns_done']}/{r['turns_expected']} turns, p50 {r['latency_p50']:.2f} s, "
                  f"p95 {r['latency_p95']:.2f} s, {r['tokens_per_second']:.1f} tokens/s, problems {len(r['problems'])}",
                  flush=True)
            result["levels"].append(r)
    finally:
        server.terminate()  # SIGTERM: uvicorn shuts down, the engine saves every session
        server.wait(timeout=300)
    from endless.state_io import read_state

    files = sorted(sessions_dir.glob("*.st"))
    bad = []
    for f in files:
        try:
            read_state(f)
        except Exception as e:
            bad.append(f"{f.name}: {e}")
    result["session_files"] = {"saved": len(files), "expected": sum(levels), "unreadable": bad}
    base = result["levels"][0]["tokens_per_second"]
    result["batched_over_single"] = {str(r["sessions"]): r["tokens_per_second"] / base for r in result["levels"]}
    if not args.http_only:
        result["engine_alone"] = engine_alone(args.threads, args.dtype, levels)
        result["engine_batched_over_single"] = {
            age: {k: v["tokens_per_second"] / rows[str(levels[0])]["tokens_per_second"] for k, v in rows.items()}
            for age, rows in result["engine_alone"].items()}
    print(json.dumps({k: result[k] for k in ("batched_over_single", "engine_batched_over_single", "session_files")
                      if k in result}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = all(r["turns_done"] == r["turns_expected"] and not r["problems"] for r in result["levels"]) and not bad
    return 0 if ok and len(files) == sum(levels) else 1


if __name__ == "__main__":
    sys.exit(main())
