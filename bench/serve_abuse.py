"""Abuse the server while honest clients use it: a matrix of bad inputs plus random malformed
bodies, sent while honest streams run; count what got hurt.

    python bench/serve_abuse.py                                   # tiny random model, 16 streams, 200 bodies
    python bench/serve_abuse.py --model runs/cpu --streams 16 --malformed 200 --seed 0
    python bench/serve_abuse.py --slow-tool 8       # also: 4 streams next to one 8 s tool call (in-process)

The server runs in its own process (uvicorn on 127.0.0.1). Honest clients loop streaming chat
requests (greedy, 48 tokens) until the abuse is over; an honest stream is *harmed* when it gets
a non-200 status, an error event, a broken connection or no finish_reason. Every abusive
request must come back as a 4xx with OpenAI's {"error": {message, type, param, code}} JSON.
Printed: honest streams run / harmed, abusive requests by status, non-JSON (or wrongly shaped)
error bodies, 5xx responses, and the server's RSS before and after. Nothing is asserted; the
targets (issue 10) are 0 harmed, 0 non-JSON, 0 5xx.

--slow-tool S: in this process, the server's scheduler and engine run one request forced to call
a tool that sleeps S seconds, then 4 ordinary streams of 200 tokens; printed: their first-token
time and largest inter-token gap (the target: other streams delayed < 0.5 s by an 8 s tool).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

SERVER = """
import sys, uvicorn
from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served
server = load_served(sys.argv[1], cfg=ServeConfig(max_batch=int(sys.argv[3]), batch_wait_ms=5, max_queue=1000),
                     db=sys.argv[4])
uvicorn.run(create_app(server), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def bad_matrix(model: str) -> list[tuple[str, bytes, dict]]:
    """(path, raw body, headers) of every bad input issue 10 lists, and then some."""
    def chat(**kw):
        return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}).encode()
    j = {"Content-Type": "application/json"}
    out = [("/v1/chat/completions", chat(**{k: v}), j) for k, v in [
        ("seed", 2 ** 70), ("temperature", -1), ("temperature", "hot"), ("top_p", 7), ("n", 0), ("n", 10 ** 9),
        ("max_tokens", -5), ("max_tokens", 10 ** 12), ("top_logprobs", 99), ("stream_options", "yes"),
        ("metadata", "x"), ("tool_choice", "banana"), ("tool_choice", "required"), ("stop", [1, 2]),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}),
        ("logit_bias", {"1": 5}), ("conversation_id", "conv-nope"), ("messages", "hi"), ("messages", [])]]
    out += [
        ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}'
         % model.encode(), j),
        ("/v1/completions", b'{"model": "%s", "prompt": "\\udfff"}' % model.encode(), j),
        ("/v1/chat/completions", b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", j),
        ("/v1/chat/completions", chat(), {"Content-Type": "text/plain"}),
        ("/v1/chat/completions", chat(), {**j, "Origin": "http://evil.example"}),
        ("/v1/chat/completions", b"x" * (5 << 20), j),
        ("/v1/completions", json.dumps({"model": model, "prompt": "x", "suffix": "y"}).encode(), j),
        ("/v1/completions", json.dumps({"model": model, "prompt": [10 ** 9]}).encode(), j),
        ("/v1/feedback/ratings", json.dumps({"generation_id": "gen-nope", "value": 1}).encode(), j),
        ("/v1/feedback/ratings", json.dumps({"generation_id": "gen-nope", "value": 5}).encode(), j),
    ]
    return out


def malformed(model: str, rng: random.Random) -> tuple[str, bytes, dict]:
    """A random broken body: truncated, byte-flipped, wrong types, junk fields, huge numbers."""
    base = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
    kind = rng.choice(["truncate", "flip", "type", "junk", "number", "bytes", "nest"])
    if kind == "truncate":
        raw = json.dumps(base).encode()[: rng.randrange(1, 40)]
    elif kind == "flip":
        raw = bytearray(json.dumps(base).encode())
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    elif kind == "type":
        key = rng.choice(["messages", "temperature", "top_p", "n", "stream", "seed", "stop", "tools", "logprobs"])
        base[key] = rng.choice([None, "x", -1, 1e308, [], {}, [1, [2]], True, {"a": "b"}])
        raw = json.dumps(base).encode()
    elif kind == "junk":
        base[rng.choice(["zzz", "__proto__", "constructor", "llmforge"])] = rng.random()
        raw = json.dumps(base).encode()
    elif kind == "number":
        base[rng.choice(["max_tokens", "n", "seed", "top_logprobs"])] = rng.choice([2 ** 64, -(2 ** 64), 1e400])
        raw = json.dumps(base).encode()
    elif kind == "bytes":
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    else:
        depth = rng.choice([500, 5_000, 50_000])
        raw = b'{"model": "m", "messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}"
    path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/feedback/edits"])
    return path, raw, {"Content-Type": "application/json"}


def slow_tool_phase(model_path: str, seconds: float) -> None:
    import threading

    from llmforge.infer.constrain import ForcedPrefix
    from llmforge.infer.engine import Engine
    from llmforge.infer.sampling import SamplingParams
    from llmforge.serve.scheduler import Scheduler
    from llmforge.train.checkpoint import load_model, load_tokenizer

    model, _, folder = load_model(model_path)
    tok = load_tokenizer(folder)
    engine = Engine(model, tok, max_batch=8, tool_runner=lambda name, args: time.sleep(seconds) or "42")
    scheduler = Scheduler(engine, batch_wait_s=0)
    end, call = tok.token_id("<|end|>"), tok.token_id("<|tool_call|>")
    forced = [call] + tok.encode('{"name": "calculator", "arguments": {}}') + [end]
    prompt = [tok.eot_id] + tok.encode("The quick brown fox")
    times: dict[int, list[float]] = {i: [] for i in range(4)}
    left = threading.Semaphore(0)

    def on_event(i):
        def cb(ev):
            if i >= 0 and not isinstance(ev, Exception):
                times[i].append(time.perf_counter())
            if isinstance(ev, Exception) or ev.finished:
                left.release()
        return cb

    t0 = time.perf_counter()
    scheduler.submit(prompt, SamplingParams(max_tokens=len(forced) + 4, temperature=0, stop_token_ids=[end],
                                            execute_tools=True), ForcedPrefix(forced), on_event(-1))
    time.sleep(0.05)   # the tool call is running
    for i in range(4):
        scheduler.submit(prompt, SamplingParams(max_tokens=200, temperature=0), None, on_event(i))
    for _ in range(5):
        left.acquire(timeout=seconds + 120)
    scheduler.stop()
    first = max(t[0] for t in times.values()) - t0 - 0.05
    gap = max(max((b - a for a, b in zip(t, t[1:])), default=0.0) for t in times.values())
    print(f"slow tool ({seconds:g} s) next to 4 streams x 200 tokens: their first token after {first:.3f} s, "
          f"largest inter-token gap {gap:.3f} s, all 4 done {max(t[-1] for t in times.values()) - t0:.2f} s "
          f"after the call started")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def honest(client, url, model, stop, tally):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 48,
            "stream": True, "temperature": 0}
    while not stop.is_set():
        tally["run"] += 1
        try:
            finish = None
            async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}")
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        for c in chunk.get("choices", []):
                            finish = c.get("finish_reason") or finish
            if finish not in ("stop", "length"):
                raise RuntimeError("no finish_reason")
        except Exception as e:  # noqa: BLE001 - counted, shown once
            tally["harmed"] += 1
            tally.setdefault("why", str(e)[:120])


async def abuse(client, url, requests, tally):
    for path, raw, headers in requests:
        try:
            r = await client.post(url + path, content=raw, headers=headers, timeout=120)
        except Exception as e:  # noqa: BLE001
            tally["status"]["connection error"] += 1
            tally.setdefault("conn", str(e)[:120])
            continue
        tally["status"][r.status_code] += 1
        if r.status_code >= 500:
            tally["5xx"] += 1
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]
            except Exception:  # noqa: BLE001
                tally["non_json"] += 1
                tally.setdefault("bad_body", r.text[:120])
        else:
            tally["accepted"] += 1   # a malformed body that happened to still be valid


async def main_async(args, url, model):
    rng = random.Random(args.seed)
    requests = bad_matrix(model) + [malformed(model, rng) for _ in range(args.malformed)]
    rng.shuffle(requests)
    stop = asyncio.Event()
    honest_tally = {"run": 0, "harmed": 0}
    abuse_tally = {"status": Counter(), "5xx": 0, "non_json": 0, "accepted": 0}
    limits = httpx.Limits(max_connections=args.streams + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        streams = [asyncio.create_task(honest(client, url, model, stop, honest_tally)) for _ in range(args.streams)]
        await asyncio.sleep(1.0)
        start = time.perf_counter()
        chunks = [requests[i::4] for i in range(4)]   # four abusers at once
        await asyncio.gather(*[abuse(client, url, c, abuse_tally) for c in chunks])
        seconds = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*streams)
    return len(requests), seconds, honest_tally, abuse_tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint or run dir (default: a tiny random model)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--malformed", type=int, default=200)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-tool", type=float, default=0.0, help="also time streams next to a tool call this slow")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve-abuse-"))
    model_path = args.model
    if model_path is None:
        from llmforge.serve.tiny import make_tiny_checkpoint
        model_path = str(make_tiny_checkpoint(tmp / "run" / "ckpt" / "sft", max_seq_len=256).parent.parent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, model_path, str(port), str(args.max_batch),
                             str(tmp / "feedback.sqlite")], env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                model = httpx.get(url + "/v1/models", timeout=2).json()["data"][0]["id"]
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)
        rss_before = rss_mb(proc.pid)
        n, seconds, h, a = asyncio.run(main_async(args, url, model))
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"abusive requests: {n} in {seconds:.1f} s ({len(bad_matrix(model))} from the bad-input matrix, "
          f"{args.malformed} random malformed), by status: {dict(sorted(a['status'].items(), key=str))}")
    print(f"honest streams: {h['run']} run, {h['harmed']} harmed" + (f" (first: {h['why']})" if h["harmed"] else ""))
    print(f"non-JSON or wrongly shaped error bodies: {a['non_json']}" +
          (f" (first: {a['bad_body']!r})" if a["non_json"] else ""))
    print(f"5xx responses: {a['5xx']}; malformed bodies accepted as valid: {a['accepted']}")
    print(f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after")
    if args.slow_tool:
        slow_tool_phase(model_path, args.slow_tool)


if __name__ == "__main__":
    main()
