"""An OpenAI-compatible server around the one generation engine, plus the web chat and the
feedback endpoints.

    llmforge serve runs/cpu --port 8000                       # no keys: 127.0.0.1 only, one user
    llmforge serve runs/cpu --host 0.0.0.0 --api-key alice=sk-alice-123 --api-key bob=sk-bob-456
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "cpu-sft", "messages": [{"role": "user", "content": "hi"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-alice-123")   # any string without keys

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /metrics (Prometheus), GET /v1/engine/stats, the /v1/feedback/* endpoints the web chat posts
to, and the web chat at /. Request bodies are the Pydantic models of serve/protocol.py, so
/openapi.json (and /docs) describe them.

At the edge (here): every error is OpenAI's {"error": {message, type, param, code}} JSON with
its status (400 bad input, 401 key, 403 cross-origin, 404 unknown id, 413 body too large,
415 not JSON, 429 queue full or rate limit + Retry-After, 500 with the request id that the log names);
bodies over `max_body_bytes` are refused before they are read; parsing a request into engine
inputs (tokenisation) and feedback-store I/O run in worker threads, never on the event loop.
Each response carries `x-request-id`; one access-log line per request (logger
"llmforge.serve.access"). Users and keys: serve/auth.py; conversations, ratings and edits are
the user's own (serve/feedback.py). CSRF: a state-changing request must be JSON
(a cross-origin form or text/plain POST cannot be) and may not come from another Origin.

How concurrent requests share the model is in serve/scheduler.py (one engine thread, continuous
batching); the OpenAI request/response format is in serve/protocol.py.

Extensions to the OpenAI request body (all optional; the `openai` client sends them via
`extra_body`): `conversation_id` logs the answer in the feedback store (the response's
`llmforge.generation_ids` name what to rate/edit), `retrieval: true | {"k": 3}` prepends the
best chunks of the retrieval index and returns them as `llmforge.citations`, `trim_history: true`
drops the oldest turns that do not fit (`llmforge.trimmed_messages` says how many) and clamps
max_tokens to the context left.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import traceback
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmforge.errors import UserError
from llmforge.serve.auth import LOOPBACK_HOSTS, current_user, keys_from_env, parse_keys
from llmforge.serve.feedback import NotFoundError
from llmforge.serve.protocol import (APIError, Answer, ChatCompletionBody, ChatRequest, ChoiceBody, CompletionBody,
                                     CompletionRequest, EditBody, ERROR_RESPONSES, NewConversationBody, RatingBody,
                                     _finish_reason, check_text)
from llmforge.serve.scheduler import SERVE_STOPS, ModelServer, Scheduler, load_served

__all__ = ["APIError", "Answer", "ChatRequest", "ModelServer", "Scheduler", "SERVE_STOPS", "create_app",
           "load_served", "router", "run_in_thread", "serve"]

log = logging.getLogger("llmforge.serve")
access_log = logging.getLogger("llmforge.serve.access")
router = APIRouter(responses=ERROR_RESPONSES)


def stream_error(ev: Exception, index: int) -> str:
    """The SSE data of a stream's choice whose engine row failed: an OpenAI error body + its index."""
    err = ev if isinstance(ev, APIError) else APIError(500, str(ev), type="server_error", code="engine_error")
    return json.dumps({**err.body(), "index": index})


def _server(request: Request) -> ModelServer:
    return request.app.state.server


def _rid(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or f"req-{uuid.uuid4().hex[:16]}"


# ---------------------------------------------------------------- models, health

@router.get("/health")
async def health(request: Request):
    server = _server(request)
    return {"status": "ok", "model": server.model_name, "checkpoint": server.checkpoint_id,
            "uptime_s": round(time.time() - server.started, 1)}


@router.get("/v1/engine/stats")
async def stats(request: Request, user: str = Depends(current_user)):
    return _server(request).stats()


@router.get("/v1/models")
async def models(request: Request, user: str = Depends(current_user)):
    server = _server(request)
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": int(server.started),
                                        "owned_by": "llmforge", "checkpoint": server.checkpoint_id,
                                        "context_length": server.context}]}


@router.get("/v1/models/{model_id}")
async def model_info(model_id: str, request: Request, user: str = Depends(current_user)):
    server = _server(request)
    if model_id != server.model_name:
        raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
    return {"id": server.model_name, "object": "model", "created": int(server.started), "owned_by": "llmforge",
            "context_length": server.context}


# ---------------------------------------------------------------- chat completions

@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request, user: str = Depends(current_user)):
    server = _server(request)
    server.limiter.take(user, body.n or 1)   # before any work: a user over their rate limit costs nothing
    check_text(body.model_dump(by_alias=True))
    req = await run_in_threadpool(ChatRequest, server, body, user)   # tokenises: off the event loop
    server.admit(req.n)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if req.stream:
        from sse_starlette.sse import EventSourceResponse
        return EventSourceResponse(_guarded(_stream_chat(server, req, cid, created), _rid(request)),
                                   ping=15, sep="\n")
    answers = [Answer(server, req, i) for i in range(req.n)]
    completions = await asyncio.gather(*[_final(server, req.prompt, p, c, req.images)
                                         for p, c in zip(req.params, req.constraints)])
    choices, usage_out = [], 0
    extension = {"generation_ids": [], "citations": req.citations, "tool_runs": [],
                 "trimmed_messages": req.trimmed_messages, "max_tokens": req.max_tokens}
    for a, comp in zip(answers, completions):
        content, calls, runs = a.view(comp)
        message = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": a.index, "message": message, "finish_reason": _finish_reason(comp, calls),
                  "logprobs": {"content": a.logprobs(comp), "refusal": None} if req.logprobs else None}
        choices.append(choice)
        usage_out += comp.n_generated
        extension["tool_runs"].append(runs)
        extension["generation_ids"].append(await run_in_threadpool(_log, server, req, f"{cid}.{a.index}", content,
                                                                   calls, comp))
    return {"id": cid, "object": "chat.completion", "created": created, "model": server.model_name,
            "system_fingerprint": server.fingerprint, "choices": choices,
            "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": usage_out,
                      "total_tokens": len(req.prompt) + usage_out},
            "llmforge": extension}


# ---------------------------------------------------------------- completions

@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, user: str = Depends(current_user)):
    server = _server(request)
    server.limiter.take(user, body.n or 1)
    check_text(body.model_dump())
    req = await run_in_threadpool(CompletionRequest, server, body, user)
    server.admit(len(req.jobs))
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if req.stream:
        from sse_starlette.sse import EventSourceResponse
        return EventSourceResponse(_guarded(_stream_text(server, req, cid, created), _rid(request)),
                                   ping=15, sep="\n")
    comps = await asyncio.gather(*[_final(server, ids, p, None) for _, ids, p in req.jobs])
    choices = []
    for k in range(len(req.prompts)):
        group = [c for (pk, _, _), c in zip(req.jobs, comps) if pk == k]
        if req.best_of > req.n:   # keep the n samples the model finds most likely
            group = sorted(group, key=lambda c: -sum(c.logprobs))[:req.n]
        for j, comp in enumerate(group):
            lp = None
            if req.top:
                toks = [t for t, g in zip(comp.tokens, comp.generated) if g]
                lp = {"tokens": [server.tok.decode([t]) for t in toks], "token_logprobs": comp.logprobs,
                      "top_logprobs": [{server.tok.decode([t]): v for t, v in row} for row in comp.top_logprobs],
                      "text_offset": _offsets(server, toks, len(req.texts[k]) if req.echo else 0)}
            text = (req.texts[k] if req.echo else "") + comp.text
            choices.append({"index": k * req.n + j, "text": text, "finish_reason": comp.finish_reason, "logprobs": lp})
    out = sum(c.n_generated for c in comps)
    prompt_tokens = sum(len(ids) for ids in req.prompts)
    return {"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
            "system_fingerprint": server.fingerprint, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}}


def _offsets(server, toks, start):
    out, pos = [], start
    for t in toks:
        out.append(pos)
        pos += len(server.tok.decode([t]))
    return out


# ---------------------------------------------------------------- feedback (each user sees only their own)

def _store(request: Request):
    server = _server(request)
    if server.store is None:
        raise APIError(503, "this server has no feedback store; start it with --db", code="no_store",
                       type="server_error")
    return server.store


@router.post("/v1/feedback/conversations")
async def new_conversation(request: Request, body: NewConversationBody, user: str = Depends(current_user)):
    # the body ({} will do) is required: a POST without one is what a cross-site form can send
    check_text(body.model_dump())
    return {"id": await run_in_threadpool(_store(request).new_conversation, body.title, user)}


@router.get("/v1/feedback/conversations")
async def list_conversations(request: Request, user: str = Depends(current_user)):
    return {"object": "list", "data": await run_in_threadpool(_store(request).conversations, 100, user)}


@router.get("/v1/feedback/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request, user: str = Depends(current_user)):
    return await run_in_threadpool(_store(request).conversation, conversation_id, user)


@router.get("/v1/feedback/generations/{generation_id}")
async def get_generation(generation_id: str, request: Request, user: str = Depends(current_user)):
    return await run_in_threadpool(_store(request).generation, generation_id, user)


@router.post("/v1/feedback/ratings")
async def rate(body: RatingBody, request: Request, user: str = Depends(current_user)):
    check_text(body.model_dump())
    store = _store(request)
    return {"id": await run_in_threadpool(lambda: store.rate(body.generation_id, body.value, body.comment, user=user))}


@router.post("/v1/feedback/edits")
async def edit(body: EditBody, request: Request, user: str = Depends(current_user)):
    check_text(body.model_dump())
    store = _store(request)
    return {"id": await run_in_threadpool(lambda: store.edit(body.generation_id, body.content, kept=body.kept,
                                                             user=user))}


@router.post("/v1/feedback/choices")
async def choose(body: ChoiceBody, request: Request, user: str = Depends(current_user)):
    store = _store(request)
    await run_in_threadpool(lambda: store.choose(body.generation_id, user=user))
    return {"ok": True}


# ---------------------------------------------------------------- the app

def _error(status: int, message: str, param=None, code=None, type="invalid_request_error", headers=None):
    from fastapi.responses import JSONResponse
    return JSONResponse(APIError(status, message, param, code, type).body(), status_code=status, headers=headers)


_STATUS_CODES = {400: "invalid_json", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def _validation_error(exc: RequestValidationError):
    """Pydantic's first complaint as one OpenAI error: param = the top-level field it concerns."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return _error(400, "the request body is not valid JSON; send a JSON object with "
                           "Content-Type: application/json", code="invalid_json")
    if not loc or (len(loc) == 1 and isinstance(loc[0], int)):
        return _error(400, "the request body must be a JSON object (see /docs for its fields)", code="invalid_json")
    path = str(loc[0]) + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:])
    given = first.get("input")
    shown = "" if first.get("type") == "missing" else f" (got {json.dumps(given, default=str)[:60]})"
    code = "missing_required_parameter" if first.get("type") == "missing" else \
        "unknown_parameter" if first.get("type") == "extra_forbidden" else "invalid_value"
    return _error(400, f"{path}: {first.get('msg', 'invalid')}{shown}", param=str(loc[0]), code=code)


class EdgeMiddleware:
    """Pure ASGI (streams pass through untouched): a request id, CSRF / Host checks, access log,
    metrics. State-changing methods must send JSON and, when a browser names an Origin, come
    from this server's own origin; without API keys only loopback Host names are answered."""

    def __init__(self, app, keyless: bool, max_body_bytes: int, metrics=None, allowed=None):
        self.app, self.keyless, self.metrics, self.max_body = app, keyless, metrics, max_body_bytes
        self.allowed = allowed   # path -> the methods API routes take there (others get the router's 405)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        rid = f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = rid
        headers = Headers(scope=scope)
        start = time.perf_counter()
        status = [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        refusal = self._refuse(scope, headers)
        received = 0

        async def limited_receive():   # a body without (or lying about) Content-Length stops at the limit
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise StarletteHTTPException(413)
            return message

        try:
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            user = scope.get("state", {}).get("user", "-")
            access_log.info("%s %s %s %d %.1fms user=%s", rid, scope["method"], scope["path"], status[0],
                            seconds * 1000, user)
            if self.metrics is not None:
                self.metrics.observe_request(scope["path"], status[0], seconds)

    def _refuse(self, scope, headers):
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:   # refused before a byte of it is read
            return _error(413, f"the request body is {length} bytes; this server accepts at most {self.max_body}",
                          code="request_too_large")
        host = headers.get("host", "")
        hostname = urlsplit("//" + host).hostname or ""
        if self.keyless and hostname and hostname not in LOOPBACK_HOSTS and f"[{hostname}]" not in LOOPBACK_HOSTS:
            return _error(403, f"this server has no API keys and answers only on localhost, not '{host}'; "
                               "start it with --api-key to serve other hosts", code="forbidden_host")
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE") and \
                (self.allowed is None or scope["method"] in self.allowed(scope["path"])):
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return _error(403, f"cross-origin request from {origin} refused", code="cross_origin")
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json" and not ctype.endswith("+json"):
                return _error(415, "send the body as JSON with Content-Type: application/json",
                              code="unsupported_media_type")
        return None


def create_app(server: ModelServer, api_keys: str | list[str] | dict | None = None, metrics: bool = True):
    """The FastAPI app. `api_keys`: keys (comma-separated or a list, NAME=KEY entries allowed);
    None = ServeConfig.api_keys, then $LLMFORGE_API_KEYS; no keys = one local user."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    if isinstance(api_keys, dict):
        keys = dict(api_keys)
    else:
        keys = parse_keys(api_keys) if api_keys is not None else parse_keys(server.cfg.api_keys, keys_from_env())
    app = FastAPI(title="llmforge", version="0.1")
    app.state.server = server
    app.state.api_keys = keys
    app.state.metrics = None
    if metrics:
        from llmforge.serve.metrics import Metrics
        app.state.metrics = Metrics(server)
        app.add_route("/metrics", app.state.metrics.endpoint, methods=["GET"], include_in_schema=False)

    def allowed(path: str) -> set[str]:   # the methods the API routes declare for this path
        methods = set()
        for r in router.routes:
            if r.path_regex.match(path):
                methods |= set(r.methods)
        return methods

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(NotFoundError)
    async def not_found_error(_, e: NotFoundError):
        return _error(404, str(e), code="not_found")

    @app.exception_handler(UserError)
    async def user_error(_, e: UserError):
        return _error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        return _validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        methods = allowed(request.url.path)
        if e.status_code in (404, 405) and methods and request.method not in methods:
            # a wrong method on an API path (the static mount would answer for GET/HEAD): 405 naming the right ones
            e = StarletteHTTPException(405, headers={"Allow": ", ".join(sorted(methods))})
        message = {404: f"no route {request.method} {request.url.path}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path}",
                   413: f"the request body is larger than {server.cfg.max_body_bytes} bytes",
                   400: "the request body could not be parsed (invalid or too deeply nested JSON)"}.get(
            e.status_code, str(e.detail))
        return _error(e.status_code, message, code=_STATUS_CODES.get(e.status_code),
                      headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):   # the body is still OpenAI's shape; the log has the trace
        rid = _rid(request)
        log.error("%s unhandled %s: %s\n%s", rid, type(e).__name__, e, traceback.format_exc())
        return _error(500, f"internal server error (request id {rid}; the server log has the details)",
                      type="server_error", code="internal_error", headers={"x-request-id": rid})

    app.include_router(router)
    app.add_middleware(EdgeMiddleware, keyless=not keys, max_body_bytes=server.cfg.max_body_bytes,
                       metrics=app.state.metrics, allowed=allowed)
    web = Path(__file__).parent / "web"
    app.mount("/", StaticFiles(directory=web, html=True), name="web")
    return app


async def _final(server: ModelServer, prompt, params, constraint, images=None):
    last = None
    async for ev in server.run(prompt, params, constraint, images):
        last = ev
    return last.completion


def _log(server: ModelServer, req: ChatRequest, generation_id: str, content: str, calls, completion) -> str | None:
    """Record the answer in the feedback store when the request named a conversation (worker thread)."""
    if not req.conversation_id or server.store is None:
        return None
    text = content if not calls else content + "".join(f"\n[tool call] {c['function']['name']}"
                                                       f"({c['function']['arguments']})" for c in calls)
    p = req.params[0]
    return server.store.log_generation(
        req.conversation_id, req.messages, text, server.model_name, server.checkpoint_id,
        params={"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens, "seed": p.seed},
        finish_reason=_finish_reason(completion, calls), generation_id=generation_id, user=req.user)


async def _guarded(events, rid: str):
    """A stream that ends with an OpenAI-shaped error event instead of a broken connection."""
    try:
        async for item in events:
            yield item
    except APIError as e:
        yield json.dumps(e.body())
    except Exception as e:  # noqa: BLE001 - logged with its request id, the client gets JSON
        log.error("%s stream failed %s: %s\n%s", rid, type(e).__name__, e, traceback.format_exc())
        yield json.dumps(APIError(500, f"internal server error (request id {rid})", type="server_error",
                                  code="internal_error").body())


async def _stream_chat(server: ModelServer, req: ChatRequest, cid: str, created: int):
    """SSE chunks of every choice, interleaved as tokens arrive, then `data: [DONE]`."""
    def chunk(index, delta, finish=None, logprobs=None, **extra):
        return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": server.model_name, "system_fingerprint": server.fingerprint,
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                        "logprobs": logprobs}], **extra})

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i):
        try:
            async for ev in server.run(req.prompt, req.params[i], req.constraints[i], req.images):
                await queue.put((i, ev))
        except Exception as e:  # surfaces in the stream instead of killing the other choices
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(req.n)]
    answers = [Answer(server, req, i) for i in range(req.n)]
    generation_ids = [None] * req.n
    usage_out = 0
    try:
        for a in answers:
            yield chunk(a.index, {"role": "assistant", "content": "", "refusal": None},
                        llmforge={"trimmed_messages": req.trimmed_messages, "max_tokens": req.max_tokens})
        done = 0
        while done < req.n:
            i, ev = await queue.get()
            a = answers[i]
            if isinstance(ev, Exception):
                yield stream_error(ev, i)
                done += 1
                continue
            text = ev.text_delta   # the engine's streaming delta of the reply's content
            lp = {"content": a.logprobs(ev.completion)} if req.logprobs else None
            if text or (lp and lp["content"]):
                yield chunk(i, {"content": text}, logprobs=lp)
            if ev.finished:
                done += 1
                content, calls, _ = a.view(ev.completion)
                if calls:
                    yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                usage_out += ev.completion.n_generated
                generation_ids[i] = await run_in_threadpool(_log, server, req, f"{cid}.{i}", content, calls,
                                                            ev.completion)
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


async def _stream_text(server: ModelServer, req: CompletionRequest, cid: str, created: int):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, ids, params):
        try:
            async for ev in server.run(ids, params):
                await queue.put((i, ev))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, ids, p)) for i, (_, ids, p) in enumerate(req.jobs)]
    usage_out = 0
    try:
        if req.echo:
            for i, (k, _, _) in enumerate(req.jobs):
                yield json.dumps({"id": cid, "object": "text_completion", "created": created,
                                  "model": server.model_name, "choices": [{"index": i, "text": req.texts[k],
                                                                           "logprobs": None, "finish_reason": None}]})
        done = 0
        while done < len(req.jobs):
            i, ev = await queue.get()
            if isinstance(ev, Exception):
                yield stream_error(ev, i)
                done += 1
                continue
            delta = ev.text_delta
            done += ev.finished
            if ev.finished:
                usage_out += ev.completion.n_generated
            if delta or ev.finished:
                yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                                  "choices": [{"index": i, "text": delta, "logprobs": None,
                                               "finish_reason": ev.completion.finish_reason if ev.finished else None}]})
        if req.include_usage:
            prompt_tokens = sum(len(ids) for _, ids, _ in req.jobs)
            yield json.dumps({"id": cid, "object": "text_completion", "created": created, "model": server.model_name,
                              "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": usage_out,
                                                       "total_tokens": prompt_tokens + usage_out}})
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


def startup_lines(server: ModelServer, keys: dict, host: str) -> tuple[str, list[str]]:
    """(the host to bind, what the start-up log says about auth, binding and the tool sandbox)."""
    from llmforge.infer.tools import sandbox_description

    lines = []
    if keys:
        lines.append(f"auth: {len(keys)} API key(s), users: {', '.join(sorted(set(keys.values())))}")
    else:
        if host not in LOOPBACK_HOSTS:
            lines.append(f"no API keys: binding to 127.0.0.1, not {host}; pass --api-key (or set LLMFORGE_API_KEYS) "
                         "to serve other machines")
        host = "127.0.0.1"
        lines.append("auth: none (no API keys): one local user, answering on 127.0.0.1 only")
    lines += [f"tools: {line}" for line in sandbox_description()] if server.cfg.builtin_tools else \
        ["tools: built-in tools off"]
    rate = (f"{server.cfg.rate_limit_rpm:g} requests/min per user (burst {server.limiter.capacity:g})"
            if server.cfg.rate_limit_rpm else "no rate limit")
    lines.append(f"limits: bodies up to {server.cfg.max_body_bytes} bytes, {server.cfg.max_queue} queued requests, "
                 f"{server.cfg.tool_workers} tool workers, {rate}")
    return host, lines


def serve(checkpoint_or_run, host: str = "127.0.0.1", port: int = 8000, db: str | None = None,
          index: str | None = None, api_keys: list[str] | None = None, **inference) -> None:
    """`llmforge serve CKPT_OR_RUN [--dtype fp32|bf16|int8] [--speculate N] [--compile]`: the API and web
    chat until Ctrl-C."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = load_served(checkpoint_or_run, db=db, index=index, **inference)
    keys = parse_keys(server.cfg.api_keys, keys_from_env(), api_keys or [])
    app = create_app(server, api_keys=keys)
    host, lines = startup_lines(server, keys, host)
    for line in lines:
        print(line)
    print(f"serving {server.model_name} ({server.checkpoint_id}) on http://{host}:{port}  "
          f"web chat: http://{host}:{port}/  feedback: {server.store.kind}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
    finally:
        server.close()
