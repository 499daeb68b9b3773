"""The OpenAI wire format: validating a chat request into engine inputs (prompt ids, sampling
params, constraints for JSON mode / JSON schema / forced tool calls) and turning what the engine
generated back into an answer (content, tool_calls, logprobs). Errors are APIError, rendered as
OpenAI's {"error": {"message", "type", "param", "code"}} body with an HTTP status.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING

from llmforge.errors import UserError

if TYPE_CHECKING:
    from llmforge.serve.scheduler import ModelServer


class APIError(Exception):
    """An error for the client, rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}



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
        if self.conversation_id is not None and not (isinstance(self.conversation_id, str) and server.store
                                                     and server.store.has_conversation(self.conversation_id)):
            raise APIError(400, f"unknown conversation_id {self.conversation_id!r}; create one with "
                                "POST /v1/feedback/conversations", param="conversation_id")
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


