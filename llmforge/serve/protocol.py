"""The OpenAI wire format: validating a chat request into engine inputs (prompt ids, sampling
params, constraints for JSON mode / JSON schema / forced tool calls) and turning what the engine
generated back into an answer (content, tool_calls, logprobs). Errors are APIError, rendered as
OpenAI's {"error": {"message", "type", "param", "code"}} body with an HTTP status.

Request bodies are Pydantic models (strict types, bounds, unknown fields refused as OpenAI does),
so /openapi.json describes them; what needs the served model (context length, vocabulary, n's
cap, tool names) is checked when the model is turned into engine inputs (ChatRequest,
CompletionRequest), off the event loop.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

import torch

from llmforge.errors import UserError
from llmforge.infer.constrain import BanTokens
from llmforge.tokenizer.chat import content_text, image_parts

if TYPE_CHECKING:
    from llmforge.serve.scheduler import ModelServer

# Seeds are integers every JSON reader holds exactly (I-JSON, RFC 7493: |n| <= 2**53 - 1): past that a
# reader that parses numbers as doubles (JavaScript, JSON Schema tools) sees a different number, and
# a value just above the bound reads as the bound itself.
SEED_MIN, SEED_MAX = -(2 ** 53 - 1), 2 ** 53 - 1


# ---------------------------------------------------------------- request bodies (Pydantic)

def _whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(**bounds):
    """An integer field of a request body (`bounds` as Field's): 7.0 is the integer 7, as JSON Schema
    has it; 7.5, "7" and true are still refused. (Bounds inside the Annotated reach the schema.)"""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Lenient(BaseModel):   # messages echoed back from a response carry fields we do not use
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str = Field(description="data:image/png;base64,... (http(s) URLs are not fetched)")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    """OpenAI's vision input; a vision checkpoint only (`llmforge vision`)."""
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class FunctionCall(_Lenient):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Part], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaSpec(_Strict):
    name: str = "schema"
    description: str | None = None
    schema_: Union[dict[str, Any], str] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class RetrievalOptions(_Strict):
    k: Int(ge=1, le=20) = 3


class _Sampling(_Strict):
    """Fields chat and completions share (OpenAI's names and bounds)."""
    model: str = Field(description="the served model's id (GET /v1/models)")
    max_tokens: Int(ge=1) | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1, description="0 means greedy, as OpenAI treats it")
    top_k: Int(ge=0) | None = None
    n: Int(ge=1, le=128) | None = None
    seed: Int(ge=SEED_MIN, le=SEED_MAX) | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="subtracted from a token's logit per time it was generated")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="subtracted once from every token already generated")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100] added to its logit")


class ChatCompletionBody(_Sampling):
    """POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int(ge=1) | None = None
    logprobs: bool | None = False
    top_logprobs: Int(ge=0, le=20) | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool | None = None
    # llmforge extensions
    conversation_id: str | None = Field(None, max_length=64, description="log the answer in the feedback store")
    retrieval: Union[bool, RetrievalOptions, None] = None
    trim_history: bool | None = Field(False, description="drop the oldest turns (reported in llmforge."
                                      "trimmed_messages) and clamp max_tokens when the history does not fit")


class CompletionBody(_Sampling):
    """POST /v1/completions (legacy text completion)."""
    prompt: Union[str, list[str], list[Int()], list[list[Int()]]]
    logprobs: Int(ge=0, le=5) | None = None
    echo: bool | None = False
    suffix: str | None = Field(None, description="not supported (no fill-in-the-middle training): omit it")
    best_of: Int(ge=1, le=20) | None = None


class NewConversationBody(_Strict):
    title: str = Field("", max_length=200)


class RatingBody(_Strict):
    generation_id: str = Field(max_length=64)
    value: Literal[1, -1]
    comment: str = Field("", max_length=2000)


class EditBody(_Strict):
    generation_id: str = Field(max_length=64)
    content: str = Field(min_length=1, pattern=r"\S", description="the rewritten answer (not only whitespace)")
    kept: bool = True


class ChoiceBody(_Strict):
    generation_id: str = Field(max_length=64)


def surrogate_path(value, path: str = "") -> str | None:
    """Where a string holds a lone UTF-16 surrogate ("\\ud800" in JSON), which no UTF-8 text can."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = surrogate_path(v, f"{path}[{k}]" if isinstance(k, int) else (f"{path}.{k}" if path else str(k)))
        if found:
            return found
    return None


def check_text(raw: dict) -> None:
    where = surrogate_path(raw)
    if where:
        raise APIError(400, f"{where} contains a lone UTF-16 surrogate (e.g. \\ud800), which is not text; "
                            "send valid Unicode", param=where.split(".")[0].split("[")[0], code="invalid_text")


def _penalties(body: _Sampling, vocab_size: int) -> dict:
    """The body's presence/frequency penalties and logit_bias as SamplingParams fields; a
    logit_bias key must be a token id of this model and its value within OpenAI's [-100, 100]."""
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.strip().isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model; use ids 0..{vocab_size - 1}",
                           param="logit_bias", code="invalid_logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias[{key!r}] = {value} is outside [-100, 100]", param="logit_bias",
                           code="invalid_logit_bias")
        bias[int(key)] = float(value)
    return {"presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
            "logit_bias": bias}


def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else (seed + i) % (2 ** 63)


class APIError(Exception):
    """An error for the client, rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """What every error response carries (OpenAI's shape); declared in the OpenAPI document."""
    error: ErrorDetail


# the error statuses any route may answer with (serve/api.py), so /openapi.json documents them
ERROR_RESPONSES = {status: {"model": ErrorBody, "description": what} for status, what in (
    (400, "invalid request"), (401, "missing or wrong API key"), (403, "cross-origin or foreign host"),
    (404, "unknown id"), (413, "body too large"), (415, "body not JSON"), (429, "queue full or rate limit"),
    (500, "server error (with a request id)"), (503, "no feedback store"))}



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


def check_model(server: ModelServer, model: str) -> None:
    if model != server.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{server.model_name}'",
                       param="model", code="model_not_found")


def _prompt_fits_bytes(server: ModelServer, texts, param: str) -> None:
    """Refuse, before tokenising, text that cannot fit the context whatever the tokenizer does
    (a token is at most `max_token_bytes` bytes), so a 4 MB body never reaches the tokenizer."""
    size = sum(len(t.encode("utf-8")) for t in texts)
    if size > server.context * server.max_token_bytes:
        raise APIError(400, f"this model's maximum context length is {server.context} tokens; {size} bytes of "
                            f"text cannot fit it; shorten the input", param=param, code="context_length_exceeded")


class ChatRequest:
    """A validated /v1/chat/completions body turned into engine inputs (runs off the event loop:
    it tokenises). `user` owns any conversation named."""

    def __init__(self, server: ModelServer, body: ChatCompletionBody | dict, user: str = "local"):
        from llmforge.infer.sampling import SamplingParams
        from llmforge.tokenizer.chat import render_prompt, validate_messages

        self.server, self.user = server, user
        if isinstance(body, dict):   # tests and benches may pass a plain dict
            check_text(body)
            body = ChatCompletionBody.model_validate(body)
        check_model(server, body.model)
        penalties = _penalties(body, server.vocab_size)
        spec = body
        messages = [self._normalize(m.model_dump(exclude_none=True)) for m in spec.messages]
        body = spec.model_dump(exclude_unset=True, by_alias=True)
        try:
            validate_messages(messages)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        _prompt_fits_bytes(server, [content_text(m.get("content")) for m in messages], "messages")
        pixels = self._images(messages)
        self.n = _number(body, "n", 1, 1, server.cfg.max_n, int)
        self.stream = bool(spec.stream)
        self.include_usage = bool(spec.stream_options and spec.stream_options.include_usage)
        self.logprobs = bool(spec.logprobs)
        self.top_logprobs = spec.top_logprobs or 0
        seed = spec.seed
        self.conversation_id = spec.conversation_id or (spec.metadata or {}).get("conversation_id")
        if self.conversation_id is not None and not (server.store and server.store.has_conversation(
                self.conversation_id, user)):
            raise APIError(404, f"unknown conversation_id {self.conversation_id!r}; create one with "
                                "POST /v1/feedback/conversations", param="conversation_id",
                           code="conversation_not_found")
        self.messages = messages
        self.trimmed_messages = 0
        self.citations = self._retrieve(body.get("retrieval"))
        self.client_tools = self._tools(body.get("tools"), body.get("tool_choice"))
        self.forced_prefix: list[int] = []
        constraint_factory = self._constraint_factory(body.get("response_format"))
        requested = spec.max_completion_tokens or spec.max_tokens
        key = "max_completion_tokens" if spec.max_completion_tokens else "max_tokens"

        def render():
            self.prompt_messages = self._with_context(self.messages)
            self.prompt = render_prompt(server.tok, self.prompt_messages, server.image_tokens,
                                        server.image_id) + self.forced_prefix
            # the pixels of the images still in the prompt (trim_history may have dropped some)
            kept = [pixels[id(p)] for p in image_parts(self.prompt_messages)]
            self.images = torch.stack(kept) if kept else None

        render()
        while self.citations and len(self.prompt) >= server.context - 16:   # fewer sources rather than no answer
            self.citations.pop()
            render()
        if spec.trim_history:   # the web chat: drop the oldest turns until an answer has room
            want = min(requested or server.cfg.default_max_tokens, max(16, server.context // 4))
            while len(self.prompt) + want > server.context and self._drop_oldest_turn():
                render()
        room = server.context - len(self.prompt)
        if room < 1 and self.images is not None:
            raise APIError(400, f"{len(self.images)} images of {server.image_tokens} tokens each and the text make "
                                f"{len(self.prompt)} tokens, more than this model's context of {server.context}; "
                                "send fewer images", param="messages", code="context_length_exceeded")
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {server.context} tokens, but the prompt "
                                f"is {len(self.prompt)} tokens; shorten the messages", param="messages",
                           code="context_length_exceeded")
        if requested is None or spec.trim_history:
            self.max_tokens = min(requested or server.cfg.default_max_tokens, room)
        else:
            self.max_tokens = requested
        if self.max_tokens > room:
            raise APIError(400, f"max_tokens={self.max_tokens} plus the prompt's {len(self.prompt)} tokens exceeds "
                                f"the context of {server.context} tokens; ask for at most {room}", param=key,
                           code="context_length_exceeded")
        top_p = 1.0 if spec.top_p is None else spec.top_p
        temperature = 1.0 if spec.temperature is None else spec.temperature
        if top_p == 0:   # OpenAI treats top_p 0 as greedy
            temperature, top_p = 0.0, 1.0
        self.params = []
        for i in range(self.n):
            self.params.append(SamplingParams(
                max_tokens=self.max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=min(spec.top_k or 0, server.vocab_size),
                seed=_seed(seed, i),
                stop_token_ids=list(server.stop_ids),
                stop=_stop_strings(body),
                logprobs=self.logprobs,
                top_logprobs=self.top_logprobs if self.logprobs else 0,
                execute_tools=self.client_tools is None and server.engine.tool_runner is not None,
                chat=True,
                **penalties,
            ))
        self.constraints = [constraint_factory() if constraint_factory else None for _ in range(self.n)]

    def _drop_oldest_turn(self) -> bool:
        """Remove the oldest non-system turn (with the answers and tool results that follow it);
        the last user message always stays. Returns False when nothing more can go."""
        msgs = self.messages
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if first is None or last_user is None or first >= last_user:
            return False
        end = first + 1
        while end < last_user and msgs[end]["role"] != "user":
            end += 1
        self.trimmed_messages += end - first
        self.messages = msgs[:first] + msgs[end:]
        return True

    def _images(self, messages) -> dict[int, torch.Tensor]:
        """Every image part's pixels (keyed by the part's id), checked: only a vision model takes
        images, each must decode (data/images.py's limits), and only user messages hold them."""
        from llmforge.data.images import load_image, to_pixels

        out = {}
        for i, m in enumerate(messages):
            for j, part in enumerate(m["content"] if isinstance(m.get("content"), list) else []):
                if part.get("type") != "image_url":
                    continue
                where = f"messages[{i}].content[{j}]"
                if not self.server.image_tokens:
                    raise APIError(400, f"{where} is an image, but the model '{self.server.model_name}' is text-only; "
                                        "send text only, or serve a vision checkpoint (ckpt/vision, made by "
                                        "`llmforge vision`)", param="messages", code="image_input_not_supported")
                try:
                    img = load_image(part["image_url"]["url"], where)
                except UserError as e:
                    raise APIError(400, str(e), param="messages", code="invalid_image") from None
                out[id(part)] = to_pixels(img, self.server.image_size)
        return out

    @staticmethod
    def _normalize(m):
        """Accept OpenAI's content-part lists (a user's image parts stay, as parts) and
        `content: null` on tool-calling turns."""
        if not isinstance(m, dict):
            return m
        m = dict(m)
        parts = m.get("content")
        if isinstance(parts, list) and m.get("role") == "user" and any(p.get("type") == "image_url" for p in parts):
            m["content"] = [{"type": "text", "text": p["text"]} if p["type"] == "text"
                            else {"type": "image_url", "image_url": {"url": p["image_url"]["url"]}} for p in parts]
        elif isinstance(parts, list):
            if any(p.get("type") == "image_url" for p in parts):
                raise APIError(400, f"an image part in a {m.get('role')} message: images go in user messages",
                               param="messages", code="invalid_image")
            m["content"] = content_text(parts)
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
        query = next((content_text(m["content"]) for m in reversed(self.messages) if m["role"] == "user"), "")
        return [asdict(c) for c in self.server.index.search(query, k)]

    def _tools(self, tools, tool_choice):
        """Client-defined tools: validated, described to the model, their calls returned unexecuted."""
        from llmforge.infer.tools import UnknownToolError, check_tool

        self.tool_choice_given = tool_choice
        self.tool_choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
        if tools is None:
            if tool_choice == "required":
                raise APIError(400, "tool_choice 'required' needs a non-empty 'tools' list", param="tool_choice")
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
            params = fn.get("parameters") or {"type": "object"}
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


class CompletionRequest:
    """A validated /v1/completions body: one engine request per (prompt, choice).
    List prompts work (choice index = prompt index * n + j, as OpenAI numbers them); token-id
    prompts are fed as given; `echo` prepends the prompt; `best_of` samples that many and keeps
    the n with the highest total logprob; `suffix` is refused (no fill-in-the-middle)."""

    def __init__(self, server: ModelServer, body: CompletionBody | dict, user: str = "local"):
        from llmforge.infer.sampling import SamplingParams

        if isinstance(body, dict):
            check_text(body)
            body = CompletionBody.model_validate(body)
        check_model(server, body.model)
        penalties = _penalties(body, server.vocab_size)
        if body.suffix:
            raise APIError(400, "'suffix' (fill-in-the-middle) is not supported by this model; omit it",
                           param="suffix", code="unsupported_parameter")
        self.user = user
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt or len(prompt) > 16:
            raise APIError(400, "'prompt' must be a string, a token list, or a list of 1 to 16 of them",
                           param="prompt")
        _prompt_fits_bytes(server, [p for p in prompt if isinstance(p, str)], "prompt")
        self.prompts: list[list[int]] = []
        for p in prompt:
            ids = ([server.tok.eot_id] + server.tok.encode(p)) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "a token-id prompt must not be empty", param="prompt")
            if any(not 0 <= t < server.vocab_size for t in ids):
                raise APIError(400, f"token ids must be in 0..{server.vocab_size - 1}", param="prompt")
            if len(ids) >= server.context:
                raise APIError(400, f"this model's maximum context length is {server.context} tokens, but the "
                                    f"prompt is {len(ids)} tokens", param="prompt", code="context_length_exceeded")
            self.prompts.append(ids)
        self.texts = [p if isinstance(p, str) else server.tok.decode(p) for p in prompt]
        room = server.context - max(len(ids) for ids in self.prompts)
        self.max_tokens = body.max_tokens if body.max_tokens is not None else min(16, room)
        if self.max_tokens > room:
            raise APIError(400, f"max_tokens={self.max_tokens} plus the prompt's {server.context - room} tokens "
                                f"exceeds the context of {server.context}; ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        self.n = _number({"n": body.n}, "n", 1, 1, server.cfg.max_n, int)
        self.best_of = body.best_of or self.n
        if self.best_of < self.n or self.best_of > server.cfg.max_n:
            raise APIError(400, f"'best_of' must be between n ({self.n}) and {server.cfg.max_n}", param="best_of")
        self.stream = bool(body.stream)
        if self.stream and self.best_of > self.n:
            raise APIError(400, "'best_of' greater than n cannot be streamed", param="best_of")
        self.echo = bool(body.echo)
        self.top = body.logprobs or 0
        if self.echo and self.top:
            raise APIError(400, "'echo' with 'logprobs' (prompt logprobs) is not supported; use one of them",
                           param="echo", code="unsupported_parameter")
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        top_p = 1.0 if body.top_p is None else body.top_p
        temperature = 1.0 if body.temperature is None else body.temperature
        if top_p == 0:
            temperature, top_p = 0.0, 1.0
        stop = _stop_strings({"stop": body.stop})
        self.jobs = []   # (prompt index, engine prompt, params)
        for k, ids in enumerate(self.prompts):
            for j in range(self.best_of):
                self.jobs.append((k, ids, SamplingParams(
                    max_tokens=self.max_tokens, temperature=temperature, top_p=top_p,
                    top_k=min(body.top_k or 0, server.vocab_size), seed=_seed(body.seed, j),
                    stop_token_ids=[server.tok.eot_id], stop=stop, logprobs=bool(self.top) or self.best_of > self.n,
                    top_logprobs=self.top, **penalties)))


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
    """What the client sees of one choice as it grows: content (the engine's text and its
    streaming deltas), tool calls, logprobs."""

    def __init__(self, server: ModelServer, req: ChatRequest | None, index: int):
        self.server, self.req, self.index = server, req, index
        self.sent_logprobs = 0   # tokens whose logprobs were streamed

    def view(self, completion) -> tuple[str, list[dict], list[dict]]:
        """(content, tool_calls, tool_runs) of everything generated so far."""
        tokens = list(completion.tokens)
        if self.req is not None and self.req.forced_prefix:
            tokens = self.req.forced_prefix + tokens
        calls, runs = tool_calls_and_runs(self.server.tok, tokens)
        return completion.text, calls, runs   # the text: a chat reply's content, cut at a stop string

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


def tool_calls_and_runs(tok, tokens: list[int]) -> tuple[list[dict], list[dict]]:
    """The calls a reply asks the client to make (no result yet) and the runs the server made
    ({name, arguments, result}), from its tokens."""
    from llmforge.tokenizer.chat import parse_completion

    if tok.token_id("<|tool_call|>") not in tokens:
        return [], []
    msgs = parse_completion(tok, tokens)
    calls, runs = [], []
    for i, m in enumerate(msgs):
        for call in m.get("tool_calls") or []:
            result = msgs[i + 1]["content"] if i + 1 < len(msgs) and msgs[i + 1]["role"] == "tool" else None
            if result is None and call["function"]["name"]:   # a call cut off mid-JSON has no name
                calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function", "function": call["function"]})
            elif result is not None:
                runs.append({"name": call["function"]["name"], "arguments": call["function"]["arguments"],
                             "result": result})
    return calls, runs


def _finish_reason(completion, calls) -> str:
    if completion.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else completion.finish_reason or "stop"


