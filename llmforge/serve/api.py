"""An OpenAI-compatible server around the one generation engine, plus the web chat and the
feedback endpoints.

    llmforge serve runs/cpu --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "cpu-sft", "messages": [{"role": "user", "content": "hi"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /v1/engine/stats, the /v1/feedback/* endpoints the web chat posts to, and the web chat at /.

How requests share the model: every request becomes one or more engine requests (n > 1 means
n of them). A single background thread (the Scheduler) owns the engine and calls step() while
anything is queued; each step decodes every active request in one batched forward, and a
request arriving mid-flight joins at the next step (continuous batching). Events go back to
each HTTP handler through an asyncio queue, so a slow reader only delays its own stream. An
idle scheduler waits `batch_wait_ms` before its first step so requests that arrive together
start in the same batch.

Extensions to the OpenAI request body (all optional; the `openai` client sends them via
`extra_body`): `conversation_id` logs the answer in the feedback store (the response's
`llmforge.generation_ids` name what to rate/edit), `retrieval: true | {"k": 3}` prepends the
best chunks of the retrieval index and returns them as `llmforge.citations`.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from fastapi import Request  # module level: handler annotations are resolved in this namespace

from llmforge.errors import UserError

SERVE_STOPS = ("<|end|>", "<|eot|>")


class APIError(Exception):
    """An error for the client, rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- the scheduler

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
        self.thread = threading.Thread(target=self._loop, name="llmforge-scheduler", daemon=True)
        self.thread.start()

    def submit(self, prompt, params, constraint, on_event) -> int:
        with self.cv:
            rid = self.engine.add(prompt, params, constraint)
            self.callbacks[rid] = on_event
            self.cv.notify()
        return rid

    def cancel(self, rid: int) -> None:
        with self.cv:
            if self.callbacks.pop(rid, None) is not None:
                self.cancelled.add(rid)
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
                while not self.stopped and not self.engine.has_work() and not self.cancelled:
                    self.cv.wait()
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

    def __init__(self, model, tok, *, model_name: str, checkpoint_id: str, cfg=None, store=None, index=None):
        from llmforge.config import ServeConfig
        from llmforge.infer.engine import Engine
        from llmforge.infer.tools import run_tool

        self.cfg = cfg or ServeConfig()
        self.model, self.tok = model, tok
        self.model_name, self.checkpoint_id = model_name, checkpoint_id
        self.context = model.cfg.max_seq_len
        self.vocab_size = model.cfg.vocab_size
        self.engine = Engine(model, tok, max_batch=self.cfg.max_batch,
                             tool_runner=run_tool if self.cfg.builtin_tools else None)
        self.scheduler = Scheduler(self.engine, self.cfg.batch_wait_ms / 1000)
        self.store = store
        self.index = index
        self.stop_ids = [tok.token_id(s) for s in SERVE_STOPS]
        self.special = {tok.token_id(s): s for s in ("<|bos|>", "<|eot|>", "<|system|>", "<|user|>",
                                                     "<|assistant|>", "<|tool_call|>", "<|tool_result|>", "<|end|>")}
        self.tool_call_id = tok.token_id("<|tool_call|>")
        self.started = time.time()

    def close(self) -> None:
        self.scheduler.stop()
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

    async def run(self, prompt: list[int], params, constraint=None):
        """Async iterator over engine events of one request; cancels it if the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = self.scheduler.submit(prompt, params, constraint,
                                    lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        finished = False
        try:
            while True:
                ev = await queue.get()
                if isinstance(ev, Exception):
                    raise APIError(500, f"generation failed: {ev}", type="server_error", code="engine_error")
                if ev.finished:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.scheduler.cancel(rid)


def load_served(checkpoint_or_run, cfg=None, db: str | None = None, index: str | None = None) -> ModelServer:
    """Load a checkpoint folder or a run directory's latest policy (rl > sft > base) for serving."""
    from llmforge.serve.feedback import open_store
    from llmforge.train.checkpoint import load_model, load_tokenizer

    model, config, folder = load_model(checkpoint_or_run)
    tok = load_tokenizer(folder)
    in_run = folder.parent.name == "ckpt"
    run_dir = folder.parent.parent if in_run else None
    name = f"{run_dir.name}-{folder.name}" if in_run else folder.name
    checkpoint_id = f"{folder.resolve()}@step{config.get('step', '?')}"
    if cfg is None:
        from llmforge.config import resolve
        cfg = resolve(run_dir=run_dir).serve if run_dir else None
        if cfg is None:
            from llmforge.config import ServeConfig
            cfg = ServeConfig()
    db = db or cfg.db or str((run_dir or folder.parent) / "feedback.sqlite")
    index_path = index or cfg.index or (str(run_dir / "index.sqlite") if run_dir and (run_dir / "index.sqlite").exists()
                                        else "")
    rag = None
    if index_path:
        from llmforge.infer.rag import RagIndex
        rag = RagIndex.open(index_path, model=model, tok=tok)
    return ModelServer(model, tok, model_name=name, checkpoint_id=checkpoint_id, cfg=cfg,
                       store=open_store(db), index=rag)


# ---------------------------------------------------------------- request parsing

def _number(body, key, default, lo, hi, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise APIError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}, got {value!r}", param=key,
                       code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {value}", param=key,
                       code="invalid_value")
    return kind(value)


def _stop_strings(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return stop


class ChatRequest:
    """A validated /v1/chat/completions body turned into engine inputs."""

    def __init__(self, server: ModelServer, body: dict):
        from llmforge.infer.sampling import SamplingParams
        from llmforge.tokenizer.chat import render_prompt, validate_messages

        self.server = server
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.model = body.get("model")
        if not isinstance(self.model, str):
            raise APIError(400, "'model' is required; GET /v1/models lists the served model", param="model")
        if self.model != server.model_name:
            raise APIError(404, f"the model '{self.model}' does not exist; this server serves "
                                f"'{server.model_name}'", param="model", code="model_not_found")
        messages = body.get("messages")
        if messages is None:
            raise APIError(400, "'messages' is required: a list of {role, content} messages", param="messages")
        messages = [self._normalize(m) for m in messages] if isinstance(messages, list) else messages
        try:
            validate_messages(messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        self.messages = messages
        self.n = _number(body, "n", 1, 1, server.cfg.max_n, int)
        self.stream = bool(body.get("stream", False))
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.logprobs = bool(body.get("logprobs", False))
        self.top_logprobs = _number(body, "top_logprobs", 0, 0, 20, int)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
        self.conversation_id = body.get("conversation_id") or (body.get("metadata") or {}).get("conversation_id")
        self.citations = self._retrieve(body.get("retrieval"))
        self.client_tools = self._tools(body.get("tools"), body.get("tool_choice"))
        self.prompt_messages = self._with_context(messages)
        self.prompt = render_prompt(server.tok, self.prompt_messages)
        while self.citations and len(self.prompt) >= server.context - 16:   # fewer sources rather than no answer
            self.citations.pop()
            self.prompt_messages = self._with_context(messages)
            self.prompt = render_prompt(server.tok, self.prompt_messages)
        self.forced_prefix: list[int] = []
        constraint_factory = self._constraint_factory(body.get("response_format"))
        if self.forced_prefix:
            self.prompt = self.prompt + self.forced_prefix
        room = server.context - len(self.prompt)
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {server.context} tokens, but the prompt "
                                f"is {len(self.prompt)} tokens; shorten the messages", param="messages",
                           code="context_length_exceeded")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if max_tokens is None:
            max_tokens = min(server.cfg.default_max_tokens, room)
        self.max_tokens = _number({key: max_tokens}, key, None, 1, server.context, int)
        if self.max_tokens > room:
            raise APIError(400, f"max_tokens={self.max_tokens} plus the prompt's {len(self.prompt)} tokens exceeds "
                                f"the context of {server.context} tokens; ask for at most {room}", param=key,
                           code="context_length_exceeded")
        self.params = []
        for i in range(self.n):
            self.params.append(SamplingParams(
                max_tokens=self.max_tokens,
                temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                top_k=_number(body, "top_k", 0, 0, server.vocab_size, int),
                seed=None if seed is None else seed + i,
                stop_token_ids=list(server.stop_ids),
                stop=_stop_strings(body),
                logprobs=self.logprobs,
                top_logprobs=self.top_logprobs if self.logprobs else 0,
                execute_tools=self.client_tools is None and server.engine.tool_runner is not None,
            ))
        self.constraints = [constraint_factory() if constraint_factory else None for _ in range(self.n)]

    @staticmethod
    def _normalize(m):
        """Accept OpenAI's content-part lists and `content: null` on tool-calling turns."""
        if not isinstance(m, dict):
            return m
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("content") is None and m.get("role") == "assistant":
            m["content"] = ""
        return m

    def _retrieve(self, retrieval):
        if not retrieval:
            return []
        if self.server.index is None:
            raise APIError(400, "retrieval was requested but this server has no index; start it with "
                                "--index INDEX.sqlite (built by `llmforge index add`)", param="retrieval")
        k = retrieval.get("k", self.server.cfg.retrieval_k) if isinstance(retrieval, dict) else self.server.cfg.retrieval_k
        k = _number({"k": k}, "k", 3, 1, 20, int)
        query = next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return [asdict(c) for c in self.server.index.search(query, k)]

    def _tools(self, tools, tool_choice):
        """Client-defined tools: validated, described to the model, their calls returned unexecuted."""
        from llmforge.infer.tools import UnknownToolError, check_tool

        self.tool_choice_given = tool_choice
        self.tool_choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
        if tools is None:
            if isinstance(tool_choice, dict):
                try:
                    check_tool(tool_choice.get("function", {}).get("name", ""))
                except UnknownToolError as e:
                    raise APIError(400, str(e), param="tool_choice", code="unknown_tool") from None
            return None
        if not isinstance(tools, list) or not tools:
            raise APIError(400, "'tools' must be a non-empty list of {type: function, function: {name, parameters}}",
                           param="tools")
        specs = {}
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise APIError(400, f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}",
                               param=f"tools[{i}]")
            params = fn.get("parameters", {"type": "object"})
            if not isinstance(params, dict):
                raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                               param=f"tools[{i}]")
            specs[fn["name"]] = {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in specs:
                raise APIError(400, f"tool_choice names the unknown tool '{name}'; tools given: {', '.join(specs)}",
                               param="tool_choice", code="unknown_tool")
        elif choice not in ("auto", "none", "required"):
            raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {type: function, function: {name}}",
                           param="tool_choice")
        return specs

    def _with_context(self, messages):
        """Prepend what the model should know: client tools, retrieved chunks."""
        notes = []
        if self.client_tools and self.tool_choice != "none":
            notes.append("You can call these tools (write the tool-call token, then {\"name\": ..., \"arguments\": {...}}): " +
                         json.dumps(list(self.client_tools.values()), separators=(",", ":")))
        if self.citations:
            sources = "\n".join(f"[{i + 1}] ({c['source']}) {c['text']}" for i, c in enumerate(self.citations))
            notes.append("Answer using these sources and cite them as [1], [2], ...:\n" + sources)
        if not notes:
            return messages
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n\n" + "\n\n".join(notes)}] + messages[1:]
        return [{"role": "system", "content": "\n\n".join(notes)}] + messages

    def _constraint_factory(self, response_format):
        """JSON mode / JSON schema / forced tool calls -> a per-choice constraint factory."""
        from llmforge.infer.constrain import json_constraint

        tok, server = self.server.tok, self.server
        schema, param = None, "response_format"
        if self.client_tools and self.tool_choice not in ("auto", "none"):
            names = list(self.client_tools) if self.tool_choice == "required" else [self.tool_choice["function"]["name"]]
            # A forced call: the prompt ends with <|tool_call|>, the grammar writes {"name", "arguments"}.
            schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": n},
                                                                   "arguments": self.client_tools[n]["parameters"]},
                                 "required": ["name", "arguments"]} for n in names]}
            param = "tools"
            self.forced_prefix = [server.tool_call_id]
        elif response_format is not None:
            kind = response_format.get("type") if isinstance(response_format, dict) else None
            if kind == "text":
                return None
            if kind == "json_object":
                schema = {"type": "object"}
            elif kind == "json_schema":
                spec = response_format.get("json_schema")
                if not isinstance(spec, dict) or "schema" not in spec:
                    raise APIError(400, "response_format json_schema needs {json_schema: {name, schema}}",
                                   param="response_format")
                schema = spec["schema"]
            else:
                raise APIError(400, "response_format.type must be text, json_object or json_schema",
                               param="response_format")
        elif self.tool_choice == "none" and (self.client_tools is not None or self.tool_choice_given == "none"
                                             or server.engine.tool_runner is None):
            return lambda: BanTokens(server.vocab_size, [server.tool_call_id])   # no tool calls wanted
        else:
            return None
        try:
            json_constraint(tok, schema, stop_token_ids=server.stop_ids, vocab_size=server.vocab_size)
        except UserError as e:
            raise APIError(400, str(e), param=param, code="invalid_json_schema") from None
        return lambda: json_constraint(tok, schema, stop_token_ids=server.stop_ids, vocab_size=server.vocab_size)


class BanTokens:
    """A constraint that never allows some ids (tool_choice 'none' forbids <|tool_call|>)."""

    def __init__(self, vocab_size: int, banned: list[int]):
        import torch
        self.mask = torch.ones(vocab_size, dtype=torch.bool)
        self.mask[banned] = False

    def allowed_mask(self, vocab_size: int):
        return self.mask[:vocab_size]

    def advance(self, token_id: int) -> None:
        pass

    def is_done(self) -> bool:
        return False


# ---------------------------------------------------------------- turning completions into answers

def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable bytes map to themselves, the other 68
    bytes to code points 256.. in byte order (Radford et al. 2019, the `bytes_to_unicode` table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_DECODER = _byte_decoder()


def _token_bytes(tok, token_id: int) -> list[int]:
    """The exact bytes of one token (a lone token may be half of a UTF-8 character)."""
    piece = tok.hf.id_to_token(token_id) or ""
    if piece and all(c in _BYTE_DECODER for c in piece):   # specials like <|end|> are printable ASCII too
        return [_BYTE_DECODER[c] for c in piece]
    return list(tok.decode([token_id]).encode("utf-8"))



class Answer:
    """What the client sees of one choice as it grows: content, tool calls, logprobs."""

    def __init__(self, server: ModelServer, req: ChatRequest | None, index: int):
        self.server, self.req, self.index = server, req, index
        self.sent = ""           # content streamed so far
        self.sent_logprobs = 0   # tokens whose logprobs were streamed

    def view(self, completion) -> tuple[str, list[dict], list[dict]]:
        """(content, tool_calls, tool_runs) of everything generated so far."""
        from llmforge.tokenizer.chat import parse_completion

        tokens = list(completion.tokens)
        if self.req is not None and self.req.forced_prefix:
            tokens = self.req.forced_prefix + tokens
        if self.server.tool_call_id not in tokens:
            text = completion.text   # already cut at a stop string by the engine
            for name in self.server.special.values():   # a stray special token is not content
                text = text.replace(name, "")
            return text, [], []
        msgs = parse_completion(self.server.tok, tokens)
        content = "".join(m.get("content") or "" for m in msgs if m["role"] == "assistant")
        runs, calls = [], []
        for i, m in enumerate(msgs):
            for call in m.get("tool_calls") or []:
                result = msgs[i + 1]["content"] if i + 1 < len(msgs) and msgs[i + 1]["role"] == "tool" else None
                if result is None and call["function"]["name"]:   # a call cut off mid-JSON has no name
                    calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                                  "function": call["function"]})
                elif result is not None:
                    runs.append({"name": call["function"]["name"], "arguments": call["function"]["arguments"],
                                 "result": result})
        return content, calls, runs

    def delta(self, completion, final: bool) -> str:
        content = self.view(completion)[0]
        if not final:
            content = content.rstrip("\ufffd")   # hold back half of a multi-byte character
        if not content.startswith(self.sent):
            return ""
        out, self.sent = content[len(self.sent):], content
        return out

    def logprobs(self, completion, upto: int | None = None) -> list[dict]:
        tok = self.server.tok
        out = []
        end = len(completion.logprobs) if upto is None else upto
        tops = completion.top_logprobs
        for k in range(self.sent_logprobs, end):
            if not completion.generated[k] or completion.tokens[k] in self.server.special:
                continue
            t = completion.tokens[k]
            item = {"token": tok.decode([t]), "logprob": completion.logprobs[k], "bytes": _token_bytes(tok, t),
                    "top_logprobs": []}
            if k < len(tops):
                item["top_logprobs"] = [{"token": tok.decode([i]), "logprob": lp, "bytes": _token_bytes(tok, i)}
                                        for i, lp in tops[k]]
            out.append(item)
        self.sent_logprobs = end
        return out


def _finish_reason(completion, calls) -> str:
    if completion.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else completion.finish_reason or "stop"


# ---------------------------------------------------------------- the app

def create_app(server: ModelServer):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.staticfiles import StaticFiles
    from sse_starlette.sse import EventSourceResponse

    app = FastAPI(title="llmforge", version="0.1")
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(UserError)
    async def user_error(_, e: UserError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(404)
    async def not_found(request, _):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}; see /docs",
                                     code="not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, _):
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                     code="method_not_allowed").body(), status_code=405)

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON; send a JSON object with "
                                "Content-Type: application/json", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "checkpoint": server.checkpoint_id,
                "uptime_s": round(time.time() - server.started, 1), "engine": server.stats()}

    @app.get("/v1/engine/stats")
    async def stats():
        return server.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": int(server.started),
                                            "owned_by": "llmforge", "checkpoint": server.checkpoint_id,
                                            "context_length": server.context}]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str):
        if model_id != server.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": server.model_name, "object": "model", "created": int(server.started), "owned_by": "llmforge"}

    # ------------------------------------------------------------ chat completions

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = ChatRequest(server, await json_body(request))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            return EventSourceResponse(_stream_chat(server, req, cid, created), ping=15, sep="\n")
        answers = [Answer(server, req, i) for i in range(req.n)]
        completions = await asyncio.gather(*[_final(server, req.prompt, p, c)
                                             for p, c in zip(req.params, req.constraints)])
        choices, usage_out = [], 0
        extension = {"generation_ids": [], "citations": req.citations, "tool_runs": []}
        for a, comp in zip(answers, completions):
            content, calls, runs = a.view(comp)
            message = {"role": "assistant", "content": content if content or not calls else None}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": a.index, "message": message, "finish_reason": _finish_reason(comp, calls),
                      "logprobs": {"content": a.logprobs(comp)} if req.logprobs else None}
            choices.append(choice)
            usage_out += sum(comp.generated)
            extension["tool_runs"].append(runs)
            extension["generation_ids"].append(_log(server, req, f"{cid}.{a.index}", content, calls, comp))
        return {"id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
                "system_fingerprint": server.checkpoint_id[-32:], "choices": choices,
                "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": usage_out,
                          "total_tokens": len(req.prompt) + usage_out},
                "llmforge": extension}

    # ------------------------------------------------------------ completions

    @app.post("/v1/completions")
    async def completions(request: Request):
        from llmforge.infer.sampling import SamplingParams

        body = await json_body(request)
        model = body.get("model")
        if model != server.model_name:
            raise APIError(404 if isinstance(model, str) else 400,
                           f"the model '{model}' does not exist; this server serves '{server.model_name}'",
                           param="model", code="model_not_found")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' is required and must be a string", param="prompt")
        ids = [server.tok.eot_id] + server.tok.encode(prompt)   # documents start after <|eot|> in pretraining
        room = server.context - len(ids)
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {server.context} tokens, but the prompt "
                                f"is {len(ids)} tokens", param="prompt", code="context_length_exceeded")
        max_tokens = _number(body, "max_tokens", min(16, room), 1, server.context, int)
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {len(ids)} tokens exceeds the context "
                                f"of {server.context}; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        n = _number(body, "n", 1, 1, server.cfg.max_n, int)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
        top = _number(body, "logprobs", 0, 0, 5, int)
        params = [SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                 top_p=_number(body, "top_p", 1.0, 0.0, 1.0), seed=None if seed is None else seed + i,
                                 stop_token_ids=[server.tok.eot_id], stop=_stop_strings(body),
                                 logprobs=bool(top), top_logprobs=top) for i in range(n)]
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.get("stream"):
            return EventSourceResponse(_stream_text(server, ids, params, cid, created), ping=15, sep="\n")
        comps = await asyncio.gather(*[_final(server, ids, p, None) for p in params])
        choices = []
        for i, comp in enumerate(comps):
            lp = None
            if top:
                toks = [t for t, g in zip(comp.tokens, comp.generated) if g]
                lp = {"tokens": [server.tok.decode([t]) for t in toks], "token_logprobs": comp.logprobs,
                      "top_logprobs": [{server.tok.decode([t]): v for t, v in row} for row in comp.top_logprobs]}
            choices.append({"index": i, "text": comp.text, "finish_reason": comp.finish_reason, "logprobs": lp})
        out = sum(len(c.tokens) for c in comps)
        return {"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": choices, "usage": {"prompt_tokens": len(ids), "completion_tokens": out,
                                              "total_tokens": len(ids) + out}}

    # ------------------------------------------------------------ feedback

    def store():
        if server.store is None:
            raise APIError(503, "this server has no feedback store; start it with --db", code="no_store")
        return server.store

    def field(body, key, kind):
        value = body.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise APIError(400, f"'{key}' is required ({kind.__name__})", param=key)
        return value

    @app.post("/v1/feedback/conversations")
    async def new_conversation(request: Request):
        body = await json_body(request)
        return {"id": store().new_conversation(str(body.get("title") or "")[:200])}

    @app.get("/v1/feedback/conversations")
    async def list_conversations():
        return {"object": "list", "data": store().conversations()}

    @app.get("/v1/feedback/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str):
        return store().conversation(conversation_id)

    @app.get("/v1/feedback/generations/{generation_id}")
    async def get_generation(generation_id: str):
        return store().generation(generation_id)

    @app.post("/v1/feedback/ratings")
    async def rate(request: Request):
        body = await json_body(request)
        return {"id": store().rate(field(body, "generation_id", str), field(body, "value", int),
                                   str(body.get("comment") or ""))}

    @app.post("/v1/feedback/edits")
    async def edit(request: Request):
        body = await json_body(request)
        return {"id": store().edit(field(body, "generation_id", str), field(body, "content", str),
                                   kept=bool(body.get("kept", True)))}

    @app.post("/v1/feedback/choices")
    async def choose(request: Request):
        body = await json_body(request)
        store().choose(field(body, "generation_id", str))
        return {"ok": True}

    web = Path(__file__).parent / "web"
    app.mount("/", StaticFiles(directory=web, html=True), name="web")
    return app


async def _final(server: ModelServer, prompt, params, constraint):
    last = None
    async for ev in server.run(prompt, params, constraint):
        last = ev
    return last.completion


def _log(server: ModelServer, req: ChatRequest, generation_id: str, content: str, calls, completion) -> str | None:
    """Record the answer in the feedback store when the request named a conversation."""
    if not req.conversation_id or server.store is None:
        return None
    text = content if not calls else content + "".join(f"\n[tool call] {c['function']['name']}"
                                                       f"({c['function']['arguments']})" for c in calls)
    p = req.params[0]
    return server.store.log_generation(
        req.conversation_id, req.messages, text, server.model_name, server.checkpoint_id,
        params={"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed},
        finish_reason=_finish_reason(completion, calls), generation_id=generation_id)


async def _stream_chat(server: ModelServer, req: ChatRequest, cid: str, created: int):
    """SSE chunks of every choice, interleaved as tokens arrive, then `data: [DONE]`."""
    def chunk(index, delta, finish=None, logprobs=None, **extra):
        return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": server.model_name, "system_fingerprint": server.checkpoint_id[-32:],
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                        "logprobs": logprobs}], **extra})

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i):
        try:
            async for ev in server.run(req.prompt, req.params[i], req.constraints[i]):
                await queue.put((i, ev))
        except Exception as e:  # surfaces in the stream instead of killing the other choices
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(req.n)]
    answers = [Answer(server, req, i) for i in range(req.n)]
    generation_ids = [None] * req.n
    usage_out = 0
    try:
        for a in answers:
            yield chunk(a.index, {"role": "assistant", "content": ""})
        done = 0
        while done < req.n:
            i, ev = await queue.get()
            a = answers[i]
            if isinstance(ev, Exception):
                yield json.dumps({"error": {"message": str(ev), "type": "server_error", "param": None,
                                            "code": "engine_error"}})
                done += 1
                continue
            text = a.delta(ev.completion, final=ev.finished)
            lp = {"content": a.logprobs(ev.completion)} if req.logprobs else None
            if text or (lp and lp["content"]):
                yield chunk(i, {"content": text}, logprobs=lp)
            if ev.finished:
                done += 1
                content, calls, _ = a.view(ev.completion)
                if calls:
                    yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                usage_out += sum(ev.completion.generated)
                generation_ids[i] = _log(server, req, f"{cid}.{i}", content, calls, ev.completion)
                yield chunk(i, {}, finish=_finish_reason(ev.completion, calls),
                            llmforge={"generation_id": generation_ids[i], "citations": req.citations})
        if req.include_usage:
            yield json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                              "model": server.model_name, "choices": [],
                              "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": usage_out,
                                        "total_tokens": len(req.prompt) + usage_out}})
        yield "[DONE]"
    finally:  # client went away (or we finished): stop generating for it
        for t in tasks:
            t.cancel()


async def _stream_text(server: ModelServer, ids, params, cid: str, created: int):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i):
        async for ev in server.run(ids, params[i]):
            await queue.put((i, ev))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(params))]
    sent = [""] * len(params)
    try:
        done = 0
        while done < len(params):
            i, ev = await queue.get()
            text = ev.completion.text if ev.finished else ev.completion.text.rstrip("\ufffd")
            delta = text[len(sent[i]):] if text.startswith(sent[i]) else ""
            sent[i] = text if text.startswith(sent[i]) else sent[i]
            done += ev.finished
            if delta or ev.finished:
                yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                                  "choices": [{"index": i, "text": delta, "logprobs": None,
                                               "finish_reason": ev.completion.finish_reason if ev.finished else None}]})
        yield "[DONE]"
    finally:
        for t in tasks:
            t.cancel()


# ---------------------------------------------------------------- running it

def run_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Start uvicorn in a background thread (tests, benchmarks); returns (base_url, stop)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("uvicorn did not start within 20 s")

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://{host}:{sock.getsockname()[1]}", stop


def serve(checkpoint_or_run, host: str = "127.0.0.1", port: int = 8000, db: str | None = None,
          index: str | None = None) -> None:
    """`llmforge serve CKPT_OR_RUN`: the API and web chat until Ctrl-C."""
    import uvicorn

    server = load_served(checkpoint_or_run, db=db, index=index)
    app = create_app(server)
    print(f"serving {server.model_name} ({server.checkpoint_id}) on http://{host}:{port}  "
          f"web chat: http://{host}:{port}/  feedback: {server.store.url}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        server.close()
