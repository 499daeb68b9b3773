"""How concurrent requests share one model: the Scheduler thread that owns the engine, and the
ModelServer that bundles a loaded checkpoint with it (plus the feedback store and retrieval index).

Every HTTP request becomes one or more engine requests (n > 1 means n of them). A single
background thread owns the engine and calls step() while anything is queued; each step decodes
every active request in one batched forward, and a request arriving mid-flight joins at the next
step (continuous batching). Events go back to each request's asyncio queue, so a slow reader only
delays its own stream. An idle scheduler waits `batch_wait_ms` before its first step so requests
that arrive together start in the same batch. Cancellations (client disconnects) are applied
between steps, never while the engine is mid-step.

Isolation: an exception in one request's row ends that request alone (the engine turns it into
an error event); only an exception that escapes the whole step fails every request in flight.
A row whose tool call is running is parked by the engine, so the loop keeps stepping the others
and is woken when the tool returns. Admission is bounded: more than `max_queue` engine requests
waiting for a slot is a 429 with Retry-After, not an unbounded backlog; so is a user over their
rate limit (serve/auth.RateLimiter), checked before any tokenising.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict
from pathlib import Path

from llmforge.serve.protocol import APIError

SERVE_STOPS = ("<|end|>", "<|eot|>")   # an assistant turn ends at <|end|>; <|eot|> ends a document


def _weights_digest(path, chars: int = 12) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:chars]


class Scheduler:
    """Owns the engine: one thread steps it whenever there is work and hands events to callbacks.
    Cancellations are applied between steps, so the engine is never mutated mid-step."""

    def __init__(self, engine, batch_wait_s: float = 0.005):
        self.engine = engine
        self.batch_wait_s = batch_wait_s
        self.callbacks: dict[int, callable] = {}
        self.cancelled: set[int] = set()
        self.cv = threading.Condition()
        self.stopped = False
        self.steps_by_batch: dict[int, int] = {}   # active requests in a step -> how many such steps
        self.errors = 0
        engine.on_wake = self._wake
        self.thread = threading.Thread(target=self._loop, name="llmforge-scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt, params, constraint, on_event, images=None) -> int:
        with self.cv:
            rid = self.engine.add(prompt, params, constraint, images)
            self.callbacks[rid] = on_event
            self.cv.notify()
        return rid

    def cancel(self, rid: int) -> None:
        with self.cv:
            if self.callbacks.pop(rid, None) is not None:
                self.cancelled.add(rid)
                self.cv.notify()

    def _wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def active(self) -> int:
        with self.cv:
            return len(self.callbacks)

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self.cv:
                idle = not self.engine.has_work()
                while not self.stopped and not self.cancelled and not self.engine.runnable():
                    self.cv.wait(timeout=0.5 if self.engine.parked else None)
                if self.stopped:
                    return
                cancelled, self.cancelled = self.cancelled, set()
            if idle and self.batch_wait_s:
                time.sleep(self.batch_wait_s)   # let requests that arrive together share the first step
            for rid in cancelled:
                self.engine.cancel(rid)
            try:
                batch = len(self.engine.active) + len(self.engine.waiting)
                events = self.engine.step()
            except Exception as e:  # never let one bad step kill the server: fail the requests in flight
                self.errors += 1
                with self.cv:
                    callbacks, self.callbacks = self.callbacks, {}
                for rid, cb in callbacks.items():
                    self.engine.cancel(rid)
                    cb(e)
                continue
            self.steps_by_batch[min(batch, self.engine.max_batch)] = \
                self.steps_by_batch.get(min(batch, self.engine.max_batch), 0) + 1
            for ev in events:
                with self.cv:
                    cb = self.callbacks.pop(ev.request_id, None) if ev.finished else self.callbacks.get(ev.request_id)
                if cb is not None:
                    cb(ev)


# ---------------------------------------------------------------- the served model

class ModelServer:
    """A loaded checkpoint + tokenizer + engine + scheduler + feedback store (+ retrieval index)."""

    def __init__(self, model, tok, *, model_name: str, checkpoint_id: str, cfg=None, store=None, index=None,
                 folder=None):
        from llmforge.config import ServeConfig
        from llmforge.infer.engine import Engine
        from llmforge.infer.tools import run_tool
        from llmforge.tokenizer.chat import SPECIALS

        self.cfg = cfg or ServeConfig()
        self.model, self.tok = model, tok
        self.model_name, self.checkpoint_id = model_name, checkpoint_id   # "name@weights-digest": no paths
        self.folder = folder   # the checkpoint folder on disk (server-side only, never in a response)
        self.context = model.cfg.max_seq_len
        self.vocab_size = model.cfg.vocab_size
        # a vision checkpoint: image tokens per image, the placeholder id and the image side (0, None: text-only)
        self.image_tokens = getattr(model, "image_tokens", 0)
        self.image_id = getattr(model, "image_token_id", None)
        self.image_size = model.tower.image_size if self.image_tokens else 0
        self.engine = Engine(model, tok, max_batch=self.cfg.max_batch,
                             tool_runner=self._timed(run_tool) if self.cfg.builtin_tools else None,
                             tool_workers=self.cfg.tool_workers, prefix_cache_tokens=self.cfg.prefix_cache_tokens,
                             speculate=self.cfg.speculate, compile=self.cfg.compile)
        self.engine.warm_up()   # with serve.compile: every batch bucket compiled before the first request
        self.scheduler = Scheduler(self.engine, self.cfg.batch_wait_ms / 1000)
        from llmforge.serve.auth import RateLimiter
        self.limiter = RateLimiter(self.cfg.rate_limit_rpm, self.cfg.rate_limit_burst)
        self.store = store
        self.index = index
        self.stop_ids = [tok.token_id(s) for s in SERVE_STOPS]
        self.special = {tok.token_id(s): s for s in SPECIALS}
        self.tool_call_id = tok.token_id("<|tool_call|>")
        self.fingerprint = "fp_" + checkpoint_id.rsplit("@", 1)[-1][:12]   # names the weights, not a path
        # the most bytes one token can stand for: text longer than context x this cannot fit
        self.max_token_bytes = max(len(p.encode("utf-8")) for p in tok.hf.get_vocab()) or 1
        self.started = time.time()
        self.observer = None   # serve/metrics.Metrics: latency histograms
        self._holds_cgroup = self.cfg.builtin_tools
        if self._holds_cgroup:   # total CPU/memory/processes of the Python tool, where the machine allows
            from llmforge.infer.tools import enable_cgroup
            enable_cgroup()

    def _timed(self, runner):
        def run(name, arguments):
            start = time.perf_counter()
            try:
                return runner(name, arguments)
            finally:
                if self.on_tool_call is not None:
                    self.on_tool_call(str(name), time.perf_counter() - start)
        self.on_tool_call = None   # metrics hook: (tool name, seconds)
        return run

    def admit(self, k: int) -> None:
        """Refuse a request when the queue for slots is full (429 + Retry-After), before any work."""
        waiting = len(self.engine.waiting)
        if waiting + k > self.cfg.max_queue:
            retry = max(1, round(waiting / max(1, self.engine.max_batch)))
            raise APIError(429, f"the server is busy ({waiting} requests are waiting for a slot); retry in "
                                f"{retry} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry)})

    def close(self) -> None:
        self.scheduler.stop()
        if self._holds_cgroup:   # after the engine stopped: kill what tools left, remove the cgroup
            from llmforge.infer.tools import disable_cgroup
            self._holds_cgroup = False
            disable_cgroup()
        if self.store is not None:
            self.store.close()

    def stats(self) -> dict:
        s = asdict(self.engine.stats)
        s["mean_decode_batch"] = round(s["decode_rows"] / s["decode_batches"], 3) if s["decode_batches"] else 0.0
        s["steps_by_batch"] = dict(sorted(self.scheduler.steps_by_batch.items()))
        s["in_flight"] = self.scheduler.active()
        s["max_batch"] = self.engine.max_batch
        s["step_errors"] = self.scheduler.errors
        return s

    async def run(self, prompt: list[int], params, constraint=None, images=None):
        """Async iterator over engine events of one request (`images`: its pixels, for a vision
        model); cancels it if the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            rid = self.scheduler.submit(prompt, params, constraint,
                                        lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), images)
        except ValueError as e:   # the engine refused the inputs (length, token ids)
            raise APIError(400, str(e), param="prompt") from None
        finished = False
        obs = self.observer
        t0 = last = time.perf_counter()
        first = True
        try:
            while True:
                ev = await queue.get()
                if obs is not None and not isinstance(ev, Exception) and ev.token is not None:
                    now = time.perf_counter()
                    (obs.ttft if first else obs.itl).observe(now - last)
                    first, last = False, now
                    if ev.finished:
                        obs.e2e.observe(now - t0)
                if isinstance(ev, Exception):
                    raise APIError(500, f"generation failed: {ev}", type="server_error", code="engine_error")
                if ev.error is not None:
                    finished = True   # the engine already dropped it
                    raise APIError(500, f"generation failed: {ev.error}", type="server_error",
                                   code="engine_error")
                if ev.finished:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.scheduler.cancel(rid)


def load_served(checkpoint_or_run, cfg=None, db: str | None = None, index: str | None = None,
                **inference) -> ModelServer:
    """Load a checkpoint folder or a run directory's latest policy (rl > sft > base) for serving.
    `inference` overrides serve.dtype / serve.speculate / serve.compile (None = keep the config's)."""
    from llmforge.serve.feedback import open_store
    from llmforge.train.checkpoint import load_model, load_tokenizer

    import torch

    # GPU when there is one (bf16 weights and KV cache there), else CPU fp32. The CPU path is the tested one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config, folder = load_model(checkpoint_or_run, device=device)
    if device == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)
    tok = load_tokenizer(folder)
    in_run = folder.parent.name == "ckpt"
    run_dir = folder.parent.parent if in_run else None
    name = f"{run_dir.name}-{folder.name}" if in_run else folder.name
    # the weights' content hash: feedback rows name exactly the model that produced them
    checkpoint_id = f"{name}@{_weights_digest(folder / 'model.safetensors')}"   # no filesystem path
    if cfg is None:
        from llmforge.config import resolve
        cfg = resolve(run_dir=run_dir).serve if run_dir else None
        if cfg is None:
            from llmforge.config import ServeConfig
            cfg = ServeConfig()
    for key, value in inference.items():
        if value is not None:
            setattr(cfg, key, value)
    from llmforge.infer.quantize import for_inference
    if cfg.dtype != "fp32":
        for_inference(model, cfg.dtype)
    db = db or cfg.db or str((run_dir or folder.parent) / "feedback.sqlite")
    index_path = index or cfg.index or (str(run_dir / "index.sqlite") if run_dir and (run_dir / "index.sqlite").exists()
                                        else "")
    rag = None
    if index_path:
        from llmforge.infer.rag import RagIndex
        rag = RagIndex.open(index_path, model=model, tok=tok)
    if cfg.builtin_tools:   # the Python tool must not read the feedback store or the weights
        from llmforge.infer.tools import hide_paths
        hide_paths([folder] + ([Path(db).parent] if not str(db).startswith(("postgresql:", "postgres:")) else []))
    return ModelServer(model, tok, model_name=name, checkpoint_id=checkpoint_id, cfg=cfg,
                       store=open_store(db), index=rag, folder=folder)


