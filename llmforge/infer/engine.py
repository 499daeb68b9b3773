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
Images (a vision model, model/vision.py): `add(prompt, params, images=pixels)` with the prompt's
<|image|> positions; the image embeddings are computed once, when the request gets its slot (the
requests admitted in one step share one pass through the tower), and fill those positions in its
prefill; from then on it decodes in the batch like any other row
(no prefix cache and no speculative drafts for it: its placeholder ids do not name its content).
With `prefix_cache_tokens` > 0 a prompt that starts like a recent one gets those leading blocks'
keys/values copied into its slot and prefills only the rest (infer/prefix_cache.py).

The decode step is lean: inputs are built on the host in one go, the KV cache is written in place
and read through views (model/kv_cache.py), and all rows are sampled together as tensor ops
(infer/sampling.py: bias, penalties, constraints, temperature, top-k, top-p), with each request's
own uniform draws. `speculate=k` adds up to k prompt-lookup draft tokens per row and verifies them
in the same pass (infer/speculative.py: exact for greedy, accept/reject for sampling);
`compile=True` runs decode batches through torch.compile (infer/compiled.py). Lower-precision
weights are the caller's choice (infer/quantize.py; `--dtype bf16|int8`).

Mixture-of-experts models (model/moe.py) decode in eval mode, where routing is per token and
dropless, so a token's output never depends on the other rows or on how its prompt was split
into passes (cached decoding equals full recompute). Expert-choice models, whose experts pick
tokens over a whole training batch, decode by token choice with the trained router: each
token's top-k experts, gated by their router probabilities (bench/moe_vs_dense.py measures
the held-out loss this costs).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import random
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmforge.infer.compiled import CompiledDecode
from llmforge.infer.prefix_cache import PrefixCache
from llmforge.infer.sampling import SamplingParams, adjust_batch, sample_batch
from llmforge.infer.speculative import PromptLookup, verify
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
    inserted: int = 0                                     # how many of `tokens` the engine inserted

    @property
    def n_generated(self) -> int:
        """Tokens the model wrote: what max_tokens limits (tool results are not generated)."""
        return len(self.tokens) - self.inserted


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
    rng: random.Random                                    # the request's own uniform draws
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
    drafter: PromptLookup | None = None                   # speculative decoding's proposer for this row
    draft: list[int] = field(default_factory=list)        # tokens proposed this step (fed after pending[0])
    images: object = None                                 # (N, 3, S, S) pixels of its N images, until admitted
    image_embeds: object = None                           # (N * image_tokens, d) once admitted


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
    drafted_tokens: int = 0        # speculative decoding: tokens proposed
    accepted_tokens: int = 0       # ... and accepted (acceptance rate = accepted / drafted)


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_len: int | None = None, tool_runner=None,
                 tool_workers: int = 4, prefix_cache_tokens: int = 0, speculate: int = 0, compile: bool = False):
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch = max_batch
        self.max_len = max_len or model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, max_batch, self.max_len)
        # speculative decoding: up to `speculate` tokens per row per step proposed by prompt lookup
        # and verified in the same forward pass (infer/speculative.py); 0 = off
        self.speculate = speculate
        self._decode = CompiledDecode(model, self.cache, max_batch) if compile else None
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
        # a vision model's placeholder id (one past the text vocabulary); None for a text-only model
        self.image_id = getattr(model, "image_token_id", None)

    def warm_up(self) -> None:
        """Compile the decode step for every batch bucket now (no-op without compile=True)."""
        if self._decode is not None:
            with torch.no_grad():
                self._decode.warm(self.speculate)

    def _special(self, name: str) -> int | None:
        try:
            return self.tok.token_id(name)
        except Exception:
            return None

    # ------------------------------------------------------------ requests
    def add(self, prompt: list[int], params: SamplingParams, constraint=None, images=None) -> int:
        """Queue a request; it joins the batch at the next step with a free slot. `images`: the
        (N, 3, S, S) pixels of the N images whose <|image|> positions the prompt holds."""
        if not prompt:
            raise ValueError("empty prompt: give at least one token (e.g. <|bos|>)")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens")
        image_id = None
        if images is not None and len(images):
            if self.image_id is None:
                raise ValueError("this model is text-only: it cannot take images")
            image_id, want = self.image_id, len(images) * self.model.image_tokens
            if prompt.count(image_id) != want:
                raise ValueError(f"the prompt has {prompt.count(image_id)} image positions for {len(images)} "
                                 f"images of {self.model.image_tokens} positions each")
        else:
            images = None
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
                    or not (0 <= t < self.vocab_size or t == image_id)), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        with self.lock:
            rid = next(self.ids)
            req = _Request(rid, -1, list(prompt), params, random.Random(seed), constraint, pending=list(prompt),
                           out=Completion(prompt_len=len(prompt)), images=images)
            if self.speculate and constraint is None and not params.penalized and images is None:
                req.drafter = PromptLookup(self.speculate)
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
        events += self._encode_images([r for r in admitted if r.images is not None])
        admitted = [r for r in admitted if r.id in self.active]
        if self.prefix_cache is not None:   # a cached prefix is copied in, not computed
            for req in admitted:
                if req.image_embeds is not None:
                    continue
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
        # decode rows in slot order: consecutive slots let every layer attend to a view of the cache
        decode = sorted((r for r in rows if len(r.pending) == 1), key=lambda r: r.slot)
        prefill = [r for r in rows if len(r.pending) > 1]
        if prefill:
            logits.update(self._forward_isolated(prefill, events, last_only=True))
            self.stats.prefill_tokens += sum(len(r.pending) for r in prefill)
        if decode:
            for r in decode:
                r.draft = self._propose(r)
            logits.update(self._forward_isolated(decode, events, last_only=False))
            self.stats.decode_batches += 1
            self.stats.decode_rows += len(decode)
            self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(decode))
        done = [r for r in prefill + decode if r.id in logits]   # a failed forward already ended its rows
        for req in done:
            if self.prefix_cache is not None and not req.out.tokens and len(req.pending) > 1 \
                    and req.image_embeds is None:
                self.prefix_cache.store(req.prompt, self.cache, req.slot)   # its prompt is in the cache now
        if done:
            events.extend(self._sample(done, logits))
        return events

    def _propose(self, req: _Request) -> list[int]:
        """Draft tokens for a decode row (speculative decoding), within its token and context budget."""
        if req.drafter is None:
            return []
        room = min(req.params.max_tokens - req.out.n_generated - 1, self.max_len - 1 - (req.position + 1))
        if room <= 0:
            return []
        draft = req.drafter.propose(req.prompt + req.out.tokens, room)
        self.stats.drafted_tokens += len(draft)
        return draft

    def _forward_isolated(self, reqs: list[_Request], events: list[Event], last_only: bool) -> dict[int, torch.Tensor]:
        """The batched forward; if it raises, each row alone, ending only the rows that fail."""
        try:
            return self._forward(reqs, last_only)
        except Exception as e:
            if len(reqs) == 1:
                events.append(self._fail(reqs[0], e))
                return {}
        out: dict[int, torch.Tensor] = {}
        for r in reqs:
            try:
                out.update(self._forward([r], last_only))
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

    def _forward(self, reqs: list[_Request], last_only: bool) -> dict[int, torch.Tensor]:
        """One right-padded forward of each row's pending tokens (and draft); returns each request's
        logits (n, V) in fp32: its last position's (n = 1), or with a draft every fed position's.
        Pad positions write junk into the cache beyond a row's length; a row always rewrites a
        position before any query can see it, so the junk is never attended. Inputs are built on
        the host (the cache reads positions there once per pass, infer's one host sync)."""
        feeds = [r.pending + r.draft for r in reqs]
        compiled = self._decode is not None and not last_only and len(reqs) <= self._decode.max_rows
        T = 1 + self.speculate if compiled else max(map(len, feeds))
        # a padded row must have room past its last token (pads clamped onto a real position would
        # overwrite its key): rows at the end of the context are run at their own length
        tight = [r for r, f in zip(reqs, feeds) if len(f) < T and r.position + T > self.max_len]
        if tight:
            out = {}
            for group in [[r] for r in tight] + [[r for r in reqs if r not in tight]]:
                if group:
                    out.update(self._forward_exact(group, last_only))
            return out
        idx, pos = self._inputs(reqs, feeds, T)
        if compiled:   # a decode batch: the compiled step, static shapes
            rows = self._decode(idx.to(self.device), pos.to(self.device),
                                torch.tensor([r.slot for r in reqs], device=self.device)).float().cpu()
            return {r.id: rows[i, :len(f)] for i, (r, f) in enumerate(zip(reqs, feeds))}
        return self._forward_eager(reqs, feeds, T, idx, pos, last_only)

    def _forward_exact(self, reqs: list[_Request], last_only: bool) -> dict[int, torch.Tensor]:
        """The eager forward with no padding beyond the longest row of `reqs`."""
        feeds = [r.pending + r.draft for r in reqs]
        T = max(map(len, feeds))
        return self._forward_eager(reqs, feeds, T, *self._inputs(reqs, feeds, T), last_only)

    def _inputs(self, reqs: list[_Request], feeds: list[list[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) right-padded with 0 and their cache positions (B, T), on the host."""
        top = self.max_len - 1
        idx = torch.tensor([f + [0] * (T - len(f)) for f in feeds])
        pos = torch.tensor([[min(p, top) for p in range(r.position, r.position + T)] for r in reqs])
        return idx, pos

    def _forward_eager(self, reqs, feeds, T, idx, pos, last_only) -> dict[int, torch.Tensor]:
        # the image embeddings of the rows whose prompt is in this pass, in row order
        embeds = [r.image_embeds for r, f in zip(reqs, feeds) if r.image_embeds is not None and self.image_id in f]
        extra = {"image_embeds": torch.cat(embeds)} if embeds else {}
        h = self.model.hidden_states(idx.to(self.device), cache=self.cache, positions=pos, slots=[r.slot for r in reqs],
                                     **extra)
        n = [1 if last_only else len(f) for f in feeds]
        b = [i for i, k in enumerate(n) for _ in range(k)]
        t = [j for f, k in zip(feeds, n) for j in range(len(f) - k, len(f))]
        rows = self.model.lm_head(h[b, t] if T > 1 else h[:, 0]).float().cpu()   # only the positions sampled
        out, at = {}, 0
        for r, k in zip(reqs, n):
            out[r.id] = rows[at:at + k]
            at += k
        return out

    def _sample(self, reqs: list[_Request], logits: dict[int, torch.Tensor]) -> list[Event]:
        """Sample every row of the step at once (infer/sampling.py), verify drafts, then advance each
        request token by token. A row whose constraint or distribution fails ends alone."""
        events: list[Event] = []
        allowed: list = []
        ok = []
        for req in reqs:
            try:
                allowed.append(req.constraint.allowed_mask(self.vocab_size) if req.constraint is not None else None)
                ok.append(req)
            except Exception as e:   # this request's constraint failed: end it alone
                events.append(self._fail(req, e))
        if not ok:
            return events
        n = [len(logits[r.id]) for r in ok]
        params = [r.params for r in ok for _ in range(len(logits[r.id]))]
        generated = [r.out.tokens if r.params.penalized else [] for r in ok for _ in range(len(logits[r.id]))]
        masks = [a for a, k in zip(allowed, n) for _ in range(k)]
        adjusted = adjust_batch(torch.cat([logits[r.id] for r in ok]), params, generated, masks)
        logp = torch.log_softmax(adjusted, dim=-1)
        plain = [j for j, (r, k) in enumerate(zip(ok, n)) if k == 1]
        starts = list(itertools.accumulate([0] + n[:-1]))
        picked, errors = sample_batch(adjusted[[starts[j] for j in plain]], [ok[j].params for j in plain],
                                      [ok[j].rng.random() if not ok[j].params.greedy else 0.0 for j in plain]) \
            if plain else ([], [])
        chosen: dict[int, tuple[list[int], str | None]] = {j: ([t], e) for j, t, e in zip(plain, picked, errors)}
        for j, (r, k) in enumerate(zip(ok, n)):
            if k > 1:   # a draft: the accepted prefix plus one token of the model's own
                try:
                    toks = verify(adjusted[starts[j]:starts[j] + k], r.draft, r.params, r.rng)
                except Exception as e:   # a non-finite distribution: this request alone ends
                    chosen[j] = ([], f"{e}")
                    continue
                self.stats.accepted_tokens += len(toks) - 1
                chosen[j] = (toks, None)
        want_top = max((r.params.top_logprobs for r in ok), default=0)
        top = torch.topk(logp, want_top) if want_top else None
        token_logp = logp.gather(1, torch.tensor([chosen[j][0][i] if i < len(chosen[j][0]) else 0
                                                  for j, k in enumerate(n) for i in range(k)])[:, None])[:, 0].tolist()
        for j, req in enumerate(ok):
            toks, err = chosen[j]
            req.draft = []
            if err is not None:
                events.append(self._fail(req, ValueError(err)))
                continue
            try:
                for i, token in enumerate(toks):
                    row = starts[j] + i
                    tl = None
                    if req.params.top_logprobs:
                        k = req.params.top_logprobs
                        tl = list(zip(top.indices[row, :k].tolist(), top.values[row, :k].tolist()))
                    req.position += len(req.pending)
                    ev = self._advance(req, token, token_logp[row], tl)
                    events.append(ev)
                    if ev.finished or req.tool_future is not None:
                        break
            except Exception as e:  # this request's bookkeeping/constraint failed: end it alone
                events.append(self._fail(req, e))
        return events

    def _advance(self, req: _Request, token: int, logprob: float, top_logprobs) -> Event:
        p, out = req.params, req.out
        out.tokens.append(token)
        out.generated.append(True)
        out.logprobs.append(logprob)
        if top_logprobs is not None:
            out.top_logprobs.append(top_logprobs)
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
        if finish is None and not parked and (out.n_generated >= p.max_tokens
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

    def _encode_images(self, reqs: list[_Request]) -> list:
        """Encode the images of the requests just admitted, once each, in one batch through the
        tower; if that batch fails, request by request, so a request whose images fail ends
        alone. Returns the failure events."""
        if not reqs:
            return []
        try:
            embeds = self.model.encode_images(torch.cat([r.images for r in reqs]).to(self.device))
            for req, part in zip(reqs, embeds.split([len(r.images) * self.model.image_tokens for r in reqs])):
                req.image_embeds = part
        except Exception:
            events = []
            for req in reqs:
                try:
                    req.image_embeds = self.model.encode_images(req.images.to(self.device))
                except Exception as e:
                    events.append(self._fail(req, e))
            return events
        finally:
            for req in reqs:
                req.images = None
        return []

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
        out.inserted += len(inserted)
        out.tool_calls_run += 1
        req.pending = [self.end_id] + inserted  # the sampled <|end|> has not been fed yet
        if req.position + len(req.pending) < self.max_len:
            return None
        req.pending = []   # the result does not fit what is left of the context
        return self._event(req, None, "length")

    # ------------------------------------------------------------ batch API
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 constraints=None, show_progress: bool = False, images=None) -> list[Completion]:
        """Generate for every prompt (more prompts than slots is fine: they queue); `images`: one
        pixel tensor (or None) per prompt."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        constraints = constraints or [None] * len(prompts)
        images = images or [None] * len(prompts)
        ids = [self.add(p, sp, c, im) for p, sp, c, im in zip(prompts, params, constraints, images)]
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
