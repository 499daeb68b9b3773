"""An OpenAI-compatible server around the one generation engine, plus the web chat and the
feedback endpoints.

    llmforge serve runs/cpu --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "cpu-sft", "messages": [{"role": "user", "content": "hi"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /v1/engine/stats, the /v1/feedback/* endpoints the web chat posts to, and the web chat at /.

How concurrent requests share the model is in serve/scheduler.py (one engine thread, continuous
batching); the OpenAI request/response format is in serve/protocol.py.

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
from pathlib import Path

from fastapi import Request  # module level: handler annotations are resolved in this namespace

from llmforge.errors import UserError
from llmforge.serve.protocol import APIError, Answer, ChatRequest, _finish_reason, _number, _stop_strings
from llmforge.serve.scheduler import SERVE_STOPS, ModelServer, Scheduler, load_served

__all__ = ["APIError", "Answer", "ChatRequest", "ModelServer", "Scheduler", "SERVE_STOPS", "create_app",
           "load_served", "run_in_thread", "serve"]


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
