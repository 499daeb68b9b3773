"""THE generation engine: batched KV-cache sampling shared by RL rollouts, eval, chat and serving.

Requests occupy slots (rows) of one KV cache and advance together: each `step()` runs at most
two forward passes, one for rows that have several tokens to feed (new prompts, or a tool
result the engine inserted) and one batched decode for all rows with a single token. A request
that arrives while others are decoding simply joins at the next step (continuous batching).

    engine = Engine(model, tokenizer, max_batch=16)
    outs = engine.generate([prompt_ids, ...], SamplingParams(max_tokens=64, temperature=0.8))

For a server: `add(prompt_ids, params)` -> request id, then call `step()` repeatedly; it
returns the events (request id, new token, finished?) of that step.

The streaming delta (`Event.text_delta`) is computed here and nowhere else: the new part of
`Completion.text`, holding back a trailing partial UTF-8 character and any tail that could
still become a stop string, so the deltas of a request always add up to its final text. With
`SamplingParams.chat` the text is what a reader of the assistant's reply sees: special tokens
and tool call / tool result spans are not part of it (tokenizer/chat.parse_completion decides).

Isolation: an exception while sampling one row (a bad constraint, a non-finite distribution)
ends that request alone with an error event (`Event.error`, finish_reason "error"); a forward
pass that fails for a batch is retried row by row so only the rows that fail alone end.
Tool calls run off the batch: when a row closes a `<|tool_call|>` span its call goes to a small
worker pool and the row is *parked* (it keeps its KV-cache slot but leaves the decode batch);
the other rows keep decoding, and the result is fed at the first step after it arrives.
`on_wake` (set by a scheduler) is called from the worker when a parked row becomes runnable.
With `prefix_cache_tokens` > 0 a prompt that starts like a recent one gets those leading blocks'
keys/values copied into its slot and prefills only the rest (infer/prefix_cache.py).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmforge.infer.prefix_cache import PrefixCache
from llmforge.infer.sampling import SamplingParams, sample_token
from llmforge.model.kv_cache import KVCache
from llmforge.tokenizer.chat import SPECIALS, parse_completion


@dataclass
class Completion:
    prompt_len: int
    tokens: list[int] = field(default_factory=list)       # everything after the prompt
    generated: list[bool] = field(default_factory=list)   # False for tokens the engine inserted (tool results)
    logprobs: list[float] = field(default_factory=list)   # per token; 0.0 for inserted ones
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None                      # "stop" | "length" | "error"
    tool_calls_run: int = 0


@dataclass
class Event:
    request_id: int
    token: int | None
    text_delta: str
    finished: bool
    completion: Completion
    error: str | None = None   # set (with finished) when this request alone failed


@dataclass
class _Request:
    id: int
    slot: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    constraint: object = None
    pending: list[int] = field(default_factory=list)      # tokens to feed at the next step
    position: int = 0                                     # cache position of pending[0]
    out: Completion = None
    emitted_text: str = ""
    decoded_text: str = ""                                # text of out.tokens[:decoded_upto]
    decoded_upto: int = 0                                 # always on a whole-character boundary
    lead: list[int] = field(default_factory=list)         # chat: the reply's start written by the caller
    structured: bool = False                              # chat: a special token appeared (parse the reply)
    tool_future: object = None                            # a running tool call (the row is parked)


@dataclass
class EngineStats:
    steps: int = 0
    decode_batches: int = 0
    decode_rows: int = 0           # sum of batch sizes over decode steps
    max_decode_batch: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    requests: int = 0
    tool_calls: int = 0
    request_errors: int = 0        # requests ended alone by an exception in their own row
    prefix_hit_tokens: int = 0     # prompt tokens copied from the prefix cache instead of computed


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_len: int | None = None, tool_runner=None,
                 tool_workers: int = 4, prefix_cache_tokens: int = 0):
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch = max_batch
        self.max_len = max_len or model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, max_batch, self.max_len)
        self.free_slots = list(range(max_batch))[::-1]
        self.active: dict[int, _Request] = {}
        self.waiting: list[_Request] = []
        self.parked: dict[int, _Request] = {}   # rows whose tool call is running in the worker pool
        self.vocab_size = model.cfg.vocab_size
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.cancelled: set[int] = set()
        self.stats = EngineStats()
        # keys/values of recent prompts' leading blocks, reused by prompts that start the same way
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.tool_runner = tool_runner
        self.tool_workers = tool_workers
        self._tool_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.on_wake = None   # called (from a worker thread) when a parked row can resume
        self.end_id = self._special("<|end|>")
        self.tool_call_id = self._special("<|tool_call|>")
        self.assistant_id = self._special("<|assistant|>")
        self.special_ids = {i for i in map(self._special, SPECIALS) if i is not None}

    def _special(self, name: str) -> int | None:
        try:
            return self.tok.token_id(name)
        except Exception:
            return None

    # ------------------------------------------------------------ requests
    def add(self, prompt: list[int], params: SamplingParams, constraint=None) -> int:
        """Queue a request; it joins the batch at the next step with a free slot."""
        if not prompt:
            raise ValueError("empty prompt: give at least one token (e.g. <|bos|>)")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens")
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        gen = torch.Generator().manual_seed(seed)
        with self.lock:
            rid = next(self.ids)
            req = _Request(rid, -1, list(prompt), params, gen, constraint, pending=list(prompt),
                           out=Completion(prompt_len=len(prompt)))
            if params.chat and self.assistant_id in prompt:   # e.g. a forced <|tool_call|> after <|assistant|>
                req.lead = prompt[len(prompt) - prompt[::-1].index(self.assistant_id):]
                req.structured = bool(req.lead)
            self.waiting.append(req)
            self.stats.requests += 1
        return rid

    def cancel(self, request_id: int) -> None:
        """Drop a request (e.g. its client disconnected); safe to call from any thread: it
        takes effect at the start of the next step, never in the middle of one."""
        with self.lock:
            self.cancelled.add(request_id)

    def has_work(self) -> bool:
        return bool(self.active or self.waiting or self.parked)

    def runnable(self) -> bool:
        """Whether step() would do anything now (parked rows wait for their tool)."""
        with self.lock:
            return bool(self.active or (self.waiting and self.free_slots) or self.cancelled
                        or any(r.tool_future.done() for r in self.parked.values()))

    # ------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> list[Event]:
        events: list[Event] = []
        with self.lock:
            for rid in self.cancelled:
                req = self.active.pop(rid, None) or self.parked.pop(rid, None)
                if req is not None:
                    self.free_slots.append(req.slot)
            self.waiting = [r for r in self.waiting if r.id not in self.cancelled]
            self.cancelled.clear()
            resumed = [r for r in self.parked.values() if r.tool_future.done()]
            for req in resumed:
                del self.parked[req.id]
                self.active[req.id] = req
            admitted = []
            while self.waiting and self.free_slots:
                req = self.waiting.pop(0)
                req.slot = self.free_slots.pop()
                self.active[req.id] = req
                admitted.append(req)
        if self.prefix_cache is not None:   # a cached prefix is copied in, not computed
            for req in admitted:
                req.position = self.prefix_cache.restore(req.prompt, self.cache, req.slot)
                req.pending = req.prompt[req.position:]
                self.stats.prefix_hit_tokens += req.position
        for req in resumed:
            ev = self._resume(req)
            if ev is not None:
                events.append(ev)
        with self.lock:
            rows = list(self.active.values())
        if not rows:
            return events
        self.stats.steps += 1
        logits: dict[int, torch.Tensor] = {}
        decode = [r for r in rows if len(r.pending) == 1]
        prefill = [r for r in rows if len(r.pending) > 1]
        if prefill:
            logits.update(self._forward_isolated(prefill, events))
            self.stats.prefill_tokens += sum(len(r.pending) for r in prefill)
        if decode:
            logits.update(self._forward_isolated(decode, events))
            self.stats.decode_batches += 1
            self.stats.decode_rows += len(decode)
            self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(decode))
        for req in rows:
            if req.id not in logits:   # its forward failed: already ended with an error event
                continue
            if self.prefix_cache is not None and not req.out.tokens and len(req.pending) > 1:
                self.prefix_cache.store(req.prompt, self.cache, req.slot)   # its prompt is in the cache now
            req.position += len(req.pending)
            req.pending = []
            try:
                events.append(self._advance(req, logits[req.id]))
            except Exception as e:  # this request's sampling/constraint failed: end it alone
                events.append(self._fail(req, e))
        return events

    def _forward_isolated(self, reqs: list[_Request], events: list[Event]) -> dict[int, torch.Tensor]:
        """The batched forward; if it raises, each row alone, ending only the rows that fail."""
        try:
            return self._forward(reqs)
        except Exception as e:
            if len(reqs) == 1:
                events.append(self._fail(reqs[0], e))
                return {}
        out: dict[int, torch.Tensor] = {}
        for r in reqs:
            try:
                out.update(self._forward([r]))
            except Exception as e:
                events.append(self._fail(r, e))
        return out

    def _fail(self, req: _Request, error: BaseException) -> Event:
        req.out.finish_reason = "error"
        self.stats.request_errors += 1
        with self.lock:
            if self.active.pop(req.id, None) is not None or self.parked.pop(req.id, None) is not None:
                self.free_slots.append(req.slot)
        return Event(req.id, None, "", True, req.out, error=f"{type(error).__name__}: {error}")

    def _forward(self, reqs: list[_Request]) -> dict[int, torch.Tensor]:
        """One right-padded forward; returns each request's last-position logits (V,) in fp32.
        Pad positions write junk into the cache beyond a row's length; a row always rewrites a
        position before any query can see it, so the junk is never attended."""
        T = max(len(r.pending) for r in reqs)
        idx = torch.zeros(len(reqs), T, dtype=torch.long)
        pos = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.pending)
            idx[i, :n] = torch.tensor(r.pending)
            pos[i] = torch.arange(r.position, r.position + T).clamp(max=self.max_len - 1)
        slots = torch.tensor([r.slot for r in reqs], device=self.device)
        out = self.model(idx.to(self.device), cache=self.cache, positions=pos.to(self.device), slots=slots)
        last = torch.tensor([len(r.pending) - 1 for r in reqs], device=self.device)
        rows = out[torch.arange(len(reqs), device=self.device), last].float().cpu()
        return {r.id: rows[i] for i, r in enumerate(reqs)}

    def _advance(self, req: _Request, logits: torch.Tensor) -> Event:
        p, out = req.params, req.out
        if req.constraint is not None:
            allowed = req.constraint.allowed_mask(logits.numel())
            logits = logits.masked_fill(~allowed, float("-inf"))
        token = sample_token(logits, p, req.generator)
        logp = F.log_softmax(logits, dim=-1)
        out.tokens.append(token)
        out.generated.append(True)
        out.logprobs.append(float(logp[token]))
        if p.top_logprobs:
            top = torch.topk(logp, p.top_logprobs)
            out.top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist())))
        if req.constraint is not None:
            req.constraint.advance(token)
        self.stats.generated_tokens += 1
        req.pending = [token]

        finish = None
        parked = False
        if token in p.stop_token_ids:
            if p.execute_tools and token == self.end_id and self._in_tool_call(out) and self.tool_runner:
                self._start_tool(req)
                parked = True
            else:
                finish = "stop"
        elif req.constraint is not None and req.constraint.is_done():
            finish = "stop"
        if finish is None and not parked and (len(out.tokens) >= p.max_tokens
                                              or req.position + len(req.pending) >= self.max_len):
            finish = "length"
        return self._event(req, token, finish)

    def _event(self, req: _Request, token: int | None, finish: str | None) -> Event:
        """The request's text after its newest tokens (cut at a stop string) and THE streaming delta."""
        out, p = req.out, req.params
        text = self._visible_text(req)
        cut = min((text.find(s) for s in p.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            if req.tool_future is None:   # a parked row ends when its tool returns, not before
                finish = "stop"
        out.text = text
        if finish is None:   # hold back what may still change: half a character, the start of a stop string
            held = p.stop + SPECIALS if p.chat else p.stop
            settled = text.rstrip("\ufffd")
            settled = settled[:len(settled) - _partial_suffix(settled, held)]
        else:
            settled = text
        delta = settled[len(req.emitted_text):] if settled.startswith(req.emitted_text) else ""
        req.emitted_text = settled
        if finish is not None:
            out.finish_reason = finish
            with self.lock:
                self.active.pop(req.id, None)
                self.free_slots.append(req.slot)
        return Event(req.id, token, delta, finish is not None, out)

    def _visible_text(self, req: _Request) -> str:
        """Completion text without a final stop token. Decodes only the tokens since the last
        whole-character boundary, so a step costs O(1) decoding, not O(length). A chat reply
        that has special tokens in it (tool spans) is parsed whole instead."""
        toks = req.out.tokens
        end = len(toks) - (1 if toks and toks[-1] in req.params.stop_token_ids else 0)
        if req.params.chat:
            req.structured = req.structured or any(t in self.special_ids for t in toks[req.decoded_upto:end])
            if req.structured:
                msgs = parse_completion(self.tok, req.lead + toks[:end])
                return "".join(m.get("content") or "" for m in msgs if m["role"] == "assistant")
        tail = self.tok.decode(toks[req.decoded_upto:end])
        if tail and not tail.endswith("\ufffd"):  # no partial UTF-8 character left: commit it
            req.decoded_text += tail
            req.decoded_upto, tail = end, ""
        text = req.decoded_text + tail
        if req.params.chat:   # the model spelled a special token's name out of ordinary tokens
            for name in SPECIALS:
                text = text.replace(name, "")
        return text

    # ------------------------------------------------------------ tools
    def _in_tool_call(self, out: Completion) -> bool:
        """Whether the <|end|> just sampled closes a span that opened with <|tool_call|>."""
        for t in reversed(out.tokens[:-1]):
            if t == self.tool_call_id:
                return True
            if t in (self.end_id, self.assistant_id):
                return False
        return False

    def _start_tool(self, req: _Request) -> None:
        """Send the call to the worker pool and park the row until its result arrives."""
        out = req.out
        start = len(out.tokens) - 1 - out.tokens[::-1].index(self.tool_call_id, 1)
        call_text = self.tok.decode(out.tokens[start + 1:-1])
        runner = self.tool_runner

        def work() -> str:
            try:
                call = json.loads(call_text)
                return str(runner(call.get("name", ""), call.get("arguments", {})))
            except Exception as e:  # a malformed call is the model's mistake: show it the error
                return f"error: {e}"

        if self._tool_pool is None:
            self._tool_pool = concurrent.futures.ThreadPoolExecutor(self.tool_workers,
                                                                    thread_name_prefix="llmforge-tool")
        req.pending = []
        with self.lock:
            self.active.pop(req.id, None)
            self.parked[req.id] = req
            req.tool_future = self._tool_pool.submit(work)
        self.stats.tool_calls += 1
        if self.on_wake is not None:
            req.tool_future.add_done_callback(lambda _: self.on_wake())

    def _resume(self, req: _Request) -> Event | None:
        """Feed `<|tool_result|>RESULT<|end|><|assistant|>` after the parked call; an Event if it ends here."""
        out = req.out
        result = req.tool_future.result()
        req.tool_future = None
        inserted = ([self._special("<|tool_result|>")] + self.tok.encode(result) +
                    [self.end_id, self.assistant_id])
        out.tokens.extend(inserted)
        out.generated.extend([False] * len(inserted))
        out.logprobs.extend([0.0] * len(inserted))
        out.tool_calls_run += 1
        req.pending = [self.end_id] + inserted  # the sampled <|end|> has not been fed yet
        if req.position + len(req.pending) < self.max_len:
            return None
        req.pending = []   # the result does not fit what is left of the context
        return self._event(req, None, "length")

    # ------------------------------------------------------------ batch API
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 constraints=None, show_progress: bool = False) -> list[Completion]:
        """Generate for every prompt (more prompts than slots is fine: they queue)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        constraints = constraints or [None] * len(prompts)
        ids = [self.add(p, sp, c) for p, sp, c in zip(prompts, params, constraints)]
        results: dict[int, Completion] = {}
        while len(results) < len(ids):
            events = self.step()
            for ev in events:
                if ev.finished:
                    results[ev.request_id] = ev.completion
            if not events and self.parked:   # only tool calls are running: wait for one
                concurrent.futures.wait([r.tool_future for r in list(self.parked.values())], timeout=1.0,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
        return [results[i] for i in ids]


def _partial_suffix(text: str, strings: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper start of one of `strings`."""
    best = 0
    for s in strings:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
