"""Schemathesis against the server's own OpenAPI document: every route's declared request bodies
fuzzed, every response checked against its schema (`--checks all`).

    pip install schemathesis
    python bench/serve_schemathesis.py                 # tiny random checkpoint, 180 s budget
    python bench/serve_schemathesis.py --minutes 3 --model runs/cpu

The server runs in a subprocess (tiny random-weight checkpoint unless --model, no API keys,
127.0.0.1); `st run` gets `--max-time`, and its own summary (operations, test cases, failures
by check) is printed as it comes. Failures are Schemathesis's findings to fix in serve/; the
number is reported, never asserted.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SERVER = """
import sys, uvicorn
from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served
server = load_served(sys.argv[1], cfg=ServeConfig(max_batch=8, batch_wait_ms=5, default_max_tokens=16), db=sys.argv[3])
uvicorn.run(create_app(server), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint or run directory (default: a tiny random checkpoint)")
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        sys.exit("schemathesis is not installed: pip install schemathesis")
    tmp = Path(tempfile.mkdtemp(prefix="llmforge-st-"))
    if args.model is None:
        from llmforge.serve.tiny import make_tiny_checkpoint
        args.model = str(make_tiny_checkpoint(tmp / "ckpt"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, args.model, str(port), str(tmp / "fb.sqlite")])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    sys.exit("server exited during startup")
                time.sleep(0.5)
        cmd = [st, "run", f"{url}/openapi.json", "--checks", "all", "--max-time", str(int(args.minutes * 60)),
               "--workers", str(args.workers), "--request-timeout", "60", "--continue-on-failure",
               "--report", "junit", "--report-dir", str(tmp / "report"), "--no-color"]
        print(" ".join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=tmp).returncode   # its .schemathesis/ cache goes there, not in the checkout
        print(f"schemathesis exit code {code}; reports in {tmp / 'report'}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
