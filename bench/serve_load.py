"""Serving under load: 32 concurrent streaming clients vs the same requests one at a time.

    python bench/serve_load.py                         # random-weight `cpu`-preset model, 60 s per phase
    python bench/serve_load.py --model runs/cpu --clients 32 --seconds 60 --max-tokens 64

The server runs in its own process (`llmforge.serve.api`, uvicorn on 127.0.0.1) so its memory
can be read from /proc and the load generator does not share its interpreter. Each client loops:
POST /v1/chat/completions with stream=true, time to the first content chunk (TTFT), count the
completion tokens from the final usage chunk. Phase 1 runs N clients at once for S seconds,
phase 2 one client for S seconds; the printed ratio of aggregate tokens/s is the batching gain
measured in this one run. Numbers are not asserted anywhere; they depend on the machine.
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

SERVER = """
import sys, uvicorn
from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served
server = load_served(sys.argv[1], cfg=ServeConfig(max_batch=int(sys.argv[3]), batch_wait_ms=5), db=sys.argv[4])
uvicorn.run(create_app(server), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def build_cpu_model(folder: Path) -> Path:
    """Random weights in the `cpu` preset's shape, with a BPE tokenizer learned from pydoc topics."""
    import torch
    from pydoc_data.topics import topics

    from llmforge.config import resolve
    from llmforge.model.transformer import Transformer
    from llmforge.tokenizer.bpe import Tokenizer
    from llmforge.train.checkpoint import save_checkpoint

    cfg = resolve(preset="cpu").model
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


async def phase(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    out = {"ttft": [], "latency": [], "tokens": 0, "requests": 0, "errors": []}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        before = (await http.get("/v1/engine/stats")).json()
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*[client_loop(http, model, deadline, max_tokens, k, out) for k in range(clients)])
        elapsed = time.perf_counter() - start
        after = (await http.get("/v1/engine/stats")).json()
    rows = after["decode_rows"] - before["decode_rows"]
    batches = after["decode_batches"] - before["decode_batches"]
    ttft = np.array(out["ttft"]) * 1000 if out["ttft"] else np.array([float("nan")])
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": out["requests"],
            "errors": len(out["errors"]), "first_errors": out["errors"][:3],
            "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1), "ttft_p99_ms": round(float(np.percentile(ttft, 99)), 1),
            "latency_p50_s": round(float(np.median(out["latency"])) if out["latency"] else float("nan"), 2),
            "tokens": out["tokens"], "tokens_per_s": round(out["tokens"] / elapsed, 1),
            "mean_decode_batch": round(rows / batches, 2) if batches else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint or run directory (default: random `cpu`-preset model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="engine slots (KV-cache rows)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmforge-bench-"))
    model_path = args.model or str(build_cpu_model(tmp))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, model_path, str(port), str(args.max_batch),
                             str(tmp / "feedback.sqlite")], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    sys.exit("server exited during startup")
                time.sleep(0.5)
        model = health["model"]
        mem_start = rss_mb(proc.pid)
        print(f"server pid {proc.pid} model {model}; RSS at start {mem_start:.0f} MB; "
              f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        asyncio.run(phase(url, model, 2, 3, 8))   # warm-up (first forward passes are slow)
        concurrent = asyncio.run(phase(url, model, args.clients, args.seconds, args.max_tokens))
        mem_mid = rss_mb(proc.pid)
        sequential = asyncio.run(phase(url, model, 1, args.seconds, args.max_tokens))
        mem_end = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    result = {"model": model, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
              "concurrent": concurrent, "sequential": sequential,
              "throughput_ratio": round(concurrent["tokens_per_s"] / max(sequential["tokens_per_s"], 1e-9), 2),
              "server_rss_mb": {"start": round(mem_start), "after_concurrent": round(mem_mid), "end": round(mem_end)},
              "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
