"""Serving under load: a soak of N concurrent streaming clients, TTFT with and without prefix
caching side by side, and the same requests one at a time.

    python bench/serve_load.py                         # random-weight `cpu`-preset model: 10-min soak
    python bench/serve_load.py --model runs/cpu --clients 32 --minutes 10 --max-tokens 64
    python bench/serve_load.py --minutes 0.5 --window 10 --rounds 1 --seconds 10   # a 1-minute smoke run

Two servers run in their own processes (`llmforge.serve.api`, uvicorn on 127.0.0.1), one with
the engine's prefix cache and one without, so their memory can be read from /proc and the load
generator does not share their interpreter; outside `compare` only one is under load. Every
request sends the same `tools` list, which the server writes into the system prompt (~130
tokens shared by all requests, the case prefix caching is for), then a different user message.
Each client loops: POST /v1/chat/completions with stream=true, time to the first content chunk
(TTFT), count completion tokens from the final usage chunk.

  soak        N clients for --minutes on the prefix-cached server; its RSS is sampled every
              --rss-every seconds, growth = last sample / first sample after warm-up - 1.
  compare     --rounds windows of --window seconds in which N clients load each server at the
              same time (so a change in machine load hits both alike): TTFT p50/p99 of each.
  sequential  one client for --seconds on the cached server: the ratio of aggregate tokens/s
              is the batching gain.

Numbers are printed (and --json written), never asserted; they depend on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

PROMPTS = ["Write a short poem about the sea.", "Explain what a Python list comprehension is.",
           "What is 12 times 7?", "Give me three tips for writing clean code.",
           "Summarize the plot of a detective story.", "How do I open a file in Python?"]
# the same tools in every request: the server writes them into the shared system prompt
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city, in degrees Celsius, with wind and rain.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city name"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}]

SERVER = """
import sys, uvicorn
from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served
cfg = ServeConfig(max_batch=int(sys.argv[3]), batch_wait_ms=5, prefix_cache_tokens=int(sys.argv[5]),
                  speculate=int(sys.argv[6]), compile=sys.argv[7] == "1", dtype=sys.argv[8])
server = load_served(sys.argv[1], cfg=cfg, db=sys.argv[4])
uvicorn.run(create_app(server), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def build_cpu_model(folder: Path) -> Path:
    """Random weights in the `cpu` preset's shape (context 512), with a BPE tokenizer learned from pydoc topics."""
    import torch
    from pydoc_data.topics import topics

    from llmforge.config import resolve
    from llmforge.model.transformer import Transformer
    from llmforge.tokenizer.bpe import Tokenizer
    from llmforge.train.checkpoint import save_checkpoint

    cfg = resolve(preset="cpu").model
    cfg.max_seq_len = max(cfg.max_seq_len, 512)   # room for the shared tool prompt + the answer
    tok = Tokenizer.train(list(topics.values()), vocab_size=cfg.vocab_size)
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    return save_checkpoint(folder / "ckpt" / "sft", Transformer(cfg), kind="sft", model_cfg=cfg, tokenizer=tok,
                           meta={"stage": "bench", "step": 0})


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client_loop(http: httpx.AsyncClient, model: str, deadline: float, max_tokens: int, k: int, out: dict):
    i = k
    while time.perf_counter() < deadline:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "tools": TOOLS, "tool_choice": "auto",
                "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
                "stream_options": {"include_usage": True}}
        i += 1
        start = time.perf_counter()
        first, tokens = None, 0
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    out["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        out["errors"].append(chunk["error"]["message"])
                        break
                    for c in chunk.get("choices", []):
                        if first is None and (c["delta"].get("content") or c.get("finish_reason")):
                            first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            out["errors"].append(repr(e))
            continue
        out["ttft"].append(first if first is not None else time.perf_counter() - start)
        out["latency"].append(time.perf_counter() - start)
        out["tokens"] += tokens
        out["requests"] += 1


async def phase(url: str, model: str, clients: int, seconds: float, max_tokens: int, rss=None) -> dict:
    """N clients for `seconds`; `rss` = (pid, every_s, samples list) samples the server's memory meanwhile."""
    out = {"ttft": [], "latency": [], "tokens": 0, "requests": 0, "errors": []}
    limits = httpx.Limits(max_connections=clients + 4)

    async def sample(deadline):
        pid, every, samples = rss
        while time.perf_counter() < deadline:
            samples.append(round(rss_mb(pid), 1))
            await asyncio.sleep(min(every, max(0.0, deadline - time.perf_counter())))
        samples.append(round(rss_mb(pid), 1))

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        before = (await http.get("/v1/engine/stats")).json()
        start = time.perf_counter()
        deadline = start + seconds
        jobs = [client_loop(http, model, deadline, max_tokens, k, out) for k in range(clients)]
        await asyncio.gather(*jobs, *([sample(deadline)] if rss else []))
        elapsed = time.perf_counter() - start
        after = (await http.get("/v1/engine/stats")).json()
    rows = after["decode_rows"] - before["decode_rows"]
    batches = after["decode_batches"] - before["decode_batches"]
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": out["requests"],
            "errors": len(out["errors"]), "first_errors": out["errors"][:3], **percentiles(out["ttft"]),
            "latency_p50_s": round(float(np.median(out["latency"])) if out["latency"] else float("nan"), 2),
            "tokens": out["tokens"], "tokens_per_s": round(out["tokens"] / elapsed, 1),
            "mean_decode_batch": round(rows / batches, 2) if batches else 0.0,
            "prefix_hit_tokens": after["prefix_hit_tokens"] - before["prefix_hit_tokens"],
            "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"], "ttft_s": out["ttft"]}


def percentiles(ttft_s: list[float]) -> dict:
    ms = np.array(ttft_s) * 1000 if ttft_s else np.array([float("nan")])
    return {"ttft_p50_ms": round(float(np.percentile(ms, 50)), 1), "ttft_p99_ms": round(float(np.percentile(ms, 99)), 1)}


class Server:
    """`llmforge.serve` in a subprocess, with or without the prefix cache."""

    def __init__(self, model_path: str, max_batch: int, db: Path, prefix_cache_tokens: int, speculate: int = 0,
                 compile: bool = False, dtype: str = "fp32"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, model_path, str(port), str(max_batch), str(db),
                                      str(prefix_cache_tokens), str(speculate), str(int(compile)), dtype],
                                     stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"

    def ready(self) -> str:
        for _ in range(1200):
            try:
                return httpx.get(self.url + "/health", timeout=2).json()["model"]
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    sys.exit("server exited during startup")
                time.sleep(0.5)
        sys.exit("server did not start within 10 minutes")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint or run directory (default: random `cpu`-preset model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=10, help="soak: minutes of N-client load (0 = skip)")
    ap.add_argument("--rss-every", type=float, default=30, help="soak: seconds between RSS samples")
    ap.add_argument("--window", type=float, default=30, help="compare: seconds of load per window (0 = skip)")
    ap.add_argument("--rounds", type=int, default=3, help="compare: how many windows")
    ap.add_argument("--seconds", type=float, default=60, help="sequential: seconds of one client (0 = skip)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="engine slots (KV-cache rows)")
    ap.add_argument("--prefix-cache-tokens", type=int, default=8192, help="the cached server's prefix cache")
    ap.add_argument("--speculate", type=int, default=0, help="the cached server's serve.speculate (draft tokens per row)")
    ap.add_argument("--compile", action="store_true", help="the cached server's serve.compile (torch.compile'd decode)")
    ap.add_argument("--dtype", default="fp32", help="the cached server's serve.dtype: fp32 | bf16 | int8")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmforge-bench-"))
    model_path = args.model or str(build_cpu_model(tmp))
    cached = Server(model_path, args.max_batch, tmp / "cached.sqlite", args.prefix_cache_tokens, args.speculate,
                    args.compile, args.dtype)
    plain = Server(model_path, args.max_batch, tmp / "plain.sqlite", 0)
    result = {"max_tokens": args.max_tokens, "max_batch": args.max_batch, "clients": args.clients, "cpus": os.cpu_count()}
    try:
        model = result["model"] = cached.ready()
        plain.ready()
        for server in (cached, plain):
            asyncio.run(phase(server.url, model, 2, 3, 8))   # warm-up (first forward passes are slow)
        print(f"servers up (pid {cached.proc.pid} cached, {plain.proc.pid} plain), model {model}; "
              f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        if args.minutes:
            samples: list[float] = []
            soak = asyncio.run(phase(cached.url, model, args.clients, args.minutes * 60, args.max_tokens,
                                     rss=(cached.proc.pid, args.rss_every, samples)))
            soak.pop("ttft_s")
            soak["rss_mb"] = samples
            soak["rss_growth_pct"] = round(100 * (samples[-1] / samples[0] - 1), 1)
            result["soak"] = soak
            print(f"soak: {soak['requests']} requests, {soak['errors']} errors, {soak['tokens_per_s']} tok/s, "
                  f"RSS {samples[0]:.0f} -> {samples[-1]:.0f} MB ({soak['rss_growth_pct']:+.1f}%)", file=sys.stderr)
        if args.window:
            async def both():   # the same load on both servers at once: machine load hits them alike
                return await asyncio.gather(*[phase(server.url, model, args.clients, args.window, args.max_tokens)
                                              for server in (plain, cached)])
            runs = {"off": [], "on": []}
            for _ in range(args.rounds):
                off, on = asyncio.run(both())
                runs["off"].append(off)
                runs["on"].append(on)
            compare = {}
            for name, windows in runs.items():
                ttft = [t for w in windows for t in w["ttft_s"]]
                compare[f"prefix_cache_{name}"] = {
                    **percentiles(ttft), "requests": sum(w["requests"] for w in windows),
                    "errors": sum(w["errors"] for w in windows),
                    "tokens_per_s": round(sum(w["tokens"] for w in windows) / sum(w["seconds"] for w in windows), 1),
                    "prefill_tokens": sum(w["prefill_tokens"] for w in windows),
                    "prefix_hit_tokens": sum(w["prefix_hit_tokens"] for w in windows)}
            on, off = compare["prefix_cache_on"], compare["prefix_cache_off"]
            compare["ttft_p50_ratio_off_over_on"] = round(off["ttft_p50_ms"] / max(on["ttft_p50_ms"], 1e-9), 2)
            compare["ttft_p99_ratio_off_over_on"] = round(off["ttft_p99_ms"] / max(on["ttft_p99_ms"], 1e-9), 2)
            result["compare"] = compare
            print(f"TTFT p50/p99 ms: prefix cache off {off['ttft_p50_ms']}/{off['ttft_p99_ms']}, "
                  f"on {on['ttft_p50_ms']}/{on['ttft_p99_ms']}", file=sys.stderr)
        if args.seconds:
            seq = asyncio.run(phase(cached.url, model, 1, args.seconds, args.max_tokens))
            seq.pop("ttft_s")
            result["sequential"] = seq
            if "soak" in result:
                result["throughput_ratio"] = round(result["soak"]["tokens_per_s"] / max(seq["tokens_per_s"], 1e-9), 2)
    finally:
        cached.stop()
        plain.stop()
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
