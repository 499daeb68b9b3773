"""The chat format: OpenAI-style `messages` <-> token ids, with the assistant-only loss mask.

Layout (each <|...|> is ONE special token; everything else is BPE text):

    <|bos|>
    <|system|>{content}<|end|>                         role "system"
    <|user|>{content}<|end|>                           role "user"
    <|assistant|>{content}<|end|>                      role "assistant", plain answer
    <|assistant|>{content}<|tool_call|>{call}<|end|>   role "assistant" with tool_calls
    <|tool_result|>{content}<|end|>                    role "tool" (the result of the call before it)

`{call}` is compact JSON `{"name": NAME, "arguments": {...}}` (the OpenAI message carries
`arguments` as a JSON *string*; here it is the decoded object, so the model sees one JSON
document). `{content}` before `<|tool_call|>` may be empty. An assistant message with
several tool_calls renders them back to back, `<|tool_call|>{call1}<|end|><|tool_call|>{call2}<|end|>`,
but the engine executes one call per stop, so the tasks here train one call per turn.

Generation protocol (what infer/engine.py does with this layout):
  prompt = render_prompt(messages)          ends with <|assistant|>
  the model writes text; on <|end|>:
    - if the turn contains <|tool_call|>: call = parse_tool_call(text after <|tool_call|>),
      result = infer.tools.run_tool(name, arguments); append
      <|tool_result|>{result}<|end|><|assistant|> and continue generating;
    - otherwise the turn is over.
  `parse_completion(tok, generated_ids)` turns everything the model and engine wrote after the
  prompt back into messages: [assistant(tool_calls), tool, assistant, ...]. A call whose text is
  not valid JSON comes back as {"name": "", "arguments": RAW_TEXT} and renders back verbatim,
  so a model's malformed call can still be scored and trained on.

Images: a user message's content may be a list of OpenAI parts, {"type": "text", "text": ...} and
{"type": "image_url", "image_url": {"url": ...}} (or {"type": "image"} for an image a built-in task
carries beside the messages). Each image renders as `image_tokens` copies of <|image|>, whose id is
`image_id` = the language model's vocab_size (model/vision.py): it is no BPE token, so every
tokenizer and text checkpoint keeps its ids. The vision model fills those positions with the
image's projected patches; a text-only caller (image_tokens = 0) gets a UserError.

Loss mask: 1 on the tokens the model must learn to produce: an assistant turn's content, its
`<|tool_call|>{call}<|end|>` spans and its closing `<|end|>`. 0 on <|bos|>, every role opener
(<|assistant|> included: the prompt/engine supplies it), system/user text and tool results.
"""
from __future__ import annotations

import json

from llmforge.errors import UserError

BOS, EOT = "<|bos|>", "<|eot|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
TOOL_CALL, TOOL_RESULT, END = "<|tool_call|>", "<|tool_result|>", "<|end|>"
SPECIALS = [BOS, EOT, SYSTEM, USER, ASSISTANT, TOOL_CALL, TOOL_RESULT, END]
IMAGE = "<|image|>"   # the image placeholder: no BPE token, so typed as text it is just text (see above)
IMAGE_PART_TYPES = ("image_url", "image")
ROLES = ("system", "user", "assistant", "tool")
OPENER = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL_RESULT}

# The same layout as a Jinja template (Hugging Face `chat_template` convention: `messages`,
# `add_generation_prompt`). tests/test_chat.py checks it renders exactly render_text().
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>' + m['content'] + '<|end|>' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>' + m['content'] + '<|end|>' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|tool_result|>' + m['content'] + '<|end|>' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>' + (m['content'] or '') }}"
    "{% if m.get('tool_calls') %}"
    "{% for c in m['tool_calls'] %}"
    "{% set args = c['function']['arguments'] %}"
    "{% if c['function']['name'] == '' and args is string %}{{ '<|tool_call|>' + args + '<|end|>' }}"
    "{% else %}"
    "{% if args is not string %}{% set args = args | tojson(separators=(',', ':')) %}{% endif %}"
    "{{ '<|tool_call|>' + '{\"name\":' + c['function']['name'] | tojson + ',\"arguments\":' + args + '}' + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% else %}{{ '<|end|>' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Only features transformers' sandbox has (its `tojson` takes json.dumps keyword arguments), so
# the exported tokenizer_config.json works there unchanged. String arguments are inserted as
# they are: render() re-dumps them compactly, so the two agree whenever the string is compact
# JSON, which is what the engine and parser produce.


def _dump_call(name: str, arguments: dict) -> str:
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))


def jinja_env():
    """A jinja2 Environment whose `tojson` behaves as transformers' (json.dumps keywords, no
    HTML escaping), for rendering CHAT_TEMPLATE outside transformers."""
    import jinja2

    env = jinja2.Environment(autoescape=False, keep_trailing_newline=True)
    env.filters["tojson"] = lambda obj, **kw: json.dumps(obj, ensure_ascii=False, **kw)
    return env


def _call_arguments(call: dict, where: str) -> tuple[str, dict | str]:
    """(name, arguments dict) of one OpenAI tool_calls entry, validating its shape. The one
    exception is what parse_completion returns for a malformed call a model wrote: name ""
    and the raw text as arguments; it comes back as ("", raw text) and renders verbatim."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise UserError(f"{where}: a tool call needs {{'type': 'function', 'function': {{'name': ..., "
                        f"'arguments': '<json>'}}}}; fix the tool_calls entry")
    args = fn.get("arguments", {})
    if fn["name"] == "" and isinstance(args, str):
        return "", args
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise UserError(f"{where}: tool call '{fn['name']}' has arguments that are not valid JSON; "
                            "write them as a JSON object string") from None
    if not isinstance(args, dict):
        raise UserError(f"{where}: tool call '{fn['name']}' arguments must be a JSON object")
    return fn["name"], args


def validate_messages(messages, where: str = "messages") -> None:
    """Raise UserError unless `messages` is a list of well-formed chat messages."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty list of messages; give [{{'role': 'user', 'content': ...}}, ...]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{where}[{i}]: role must be one of {', '.join(ROLES)}; fix the message")
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""
        if isinstance(content, list) and m["role"] == "user":
            _validate_parts(content, f"{where}[{i}]")
            content = content_text(content)
        if not isinstance(content, str):
            raise UserError(f"{where}[{i}]: content must be a string (or, for a user, a list of text and "
                            "image_url parts); fix the message")
        for tok in SPECIALS:
            if tok in content:
                raise UserError(f"{where}[{i}]: content contains the reserved token {tok}; remove it")
        for call in m.get("tool_calls") or []:
            _call_arguments(call, f"{where}[{i}]")


def _validate_parts(parts: list, where: str) -> None:
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            continue
        if kind == "image_url" and isinstance(_url_of(p), str) or kind == "image":
            continue
        raise UserError(f"{where}.content[{j}]: a part must be {{'type': 'text', 'text': ...}} or "
                        "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...' or a file path}}")


def _url_of(part: dict):
    ref = part.get("image_url")
    return ref.get("url") if isinstance(ref, dict) else ref


def content_text(content) -> str:
    """The text of a message's content: the string, or its text parts joined."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def image_parts(messages) -> list[dict]:
    """Every image part of the conversation, in the order its <|image|> positions come."""
    return [p for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES]


def image_url(part: dict) -> str | None:
    """The url (a data URI or a file path) of an image_url part; None for a carried {"type": "image"}."""
    return _url_of(part) if part.get("type") == "image_url" else None


def _segments(messages) -> list[tuple[str, str, bool]]:
    """The conversation as (kind, text, trained) pieces, kind 'special', 'text' or 'image'."""
    validate_messages(messages)
    out = [("special", BOS, False)]
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        trained = role == "assistant"
        out.append(("special", OPENER[role], False))
        for kind, text in (_parts(content) if isinstance(content, list) else [("text", content)]):
            if text:
                out.append((kind, text, trained and kind == "text"))
        calls = m.get("tool_calls") or [] if role == "assistant" else []
        for call in calls:
            name, args = _call_arguments(call, "messages")
            text = args if name == "" else _dump_call(name, args)
            out += [("special", TOOL_CALL, True)] + ([("text", text, True)] if text else []) + [("special", END, True)]
        if not calls:
            out.append(("special", END, trained))
    return out


def render_text(messages, add_generation_prompt: bool = False) -> str:
    """The conversation as one string (what CHAT_TEMPLATE renders)."""
    text = "".join(t for _, t, _ in _segments(messages))
    return text + (ASSISTANT if add_generation_prompt else "")


def _parts(parts: list) -> list[tuple[str, str]]:
    return [("text", p["text"]) if p["type"] == "text" else ("image", IMAGE) for p in parts]


def render(tok, messages, image_tokens: int = 0, image_id: int | None = None) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a whole conversation; mask is 1 on assistant-produced tokens.
    Each image part becomes `image_tokens` copies of `image_id` (a vision model's), mask 0."""
    ids: list[int] = []
    mask: list[int] = []
    for kind, text, trained in _segments(messages):
        if kind == "image":
            if image_tokens <= 0 or image_id is None:
                raise UserError("the messages hold an image but this model is text-only; send text only, or "
                                "use a vision checkpoint (ckpt/vision, made by `llmforge vision`)")
            piece = [image_id] * image_tokens
        else:
            piece = [tok.token_id(text)] if kind == "special" else tok.encode(text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


def render_prompt(tok, messages, image_tokens: int = 0, image_id: int | None = None) -> list[int]:
    """Token ids of the conversation so far, ending with <|assistant|> for generation."""
    ids, _ = render(tok, messages, image_tokens, image_id)
    return ids + [tok.token_id(ASSISTANT)]


def parse_tool_call(text: str) -> tuple[str, dict]:
    """`{"name": ..., "arguments": {...}}` -> (name, arguments); ValueError if malformed."""
    obj = json.loads(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments", {}), dict):
        raise ValueError("a tool call must be {\"name\": str, \"arguments\": object}")
    return obj["name"], obj.get("arguments", {})


def _split(tok, ids) -> list[tuple[str, object]]:
    """Ids -> [('special', '<|end|>') | ('text', 'decoded text')], merging text runs."""
    special_of = {tok.token_id(s): s for s in SPECIALS}
    out: list[tuple[str, object]] = []
    run: list[int] = []
    for i in ids:
        if i in special_of:
            if run:
                out.append(("text", tok.decode(run)))
                run = []
            out.append(("special", special_of[i]))
        else:
            run.append(i)
    if run:
        out.append(("text", tok.decode(run)))
    return out


def _assistant_message(content: str, raw_calls: list[str]) -> dict:
    msg: dict = {"role": "assistant", "content": content}
    if raw_calls:
        calls = []
        for k, raw in enumerate(raw_calls):
            try:
                name, args = parse_tool_call(raw)
                arguments = json.dumps(args, ensure_ascii=False)
            except ValueError:  # malformed JSON from the model: keep it visible, name it empty
                name, arguments = "", raw
            calls.append({"id": f"call_{k}", "type": "function",
                          "function": {"name": name, "arguments": arguments}})
        msg["tool_calls"] = calls
    return msg


def parse_completion(tok, ids) -> list[dict]:
    """Everything generated after a render_prompt() prompt -> messages.

    Assistant turns end at <|end|> (or where the ids run out / hit <|eot|>); a
    <|tool_result|>...<|end|> span becomes a role "tool" message; a following <|assistant|>
    starts the next assistant turn."""
    messages: list[dict] = []
    content, calls = "", []
    state = "content"          # content | call | result | between
    buf = ""

    def close_assistant():
        nonlocal content, calls
        messages.append(_assistant_message(content, calls))
        content, calls = "", []

    for kind, value in _split(tok, ids):
        if kind == "text":
            # A model can spell a special token's name out of ordinary tokens ("<", "|", "system",
            # ...). It is not that token, but a message holding the string is refused on the way
            # back in (validate_messages), so the spelling is cut out here, where model text
            # becomes messages.
            for special in SPECIALS:
                value = value.replace(special, "")
            if state == "between":      # stray text outside any turn: treat as a new assistant turn
                state = "content"
            if state == "content":
                content += value
            else:
                buf += value
            continue
        if value == EOT or value == BOS:
            break
        if state == "content":
            if value == TOOL_CALL:
                state, buf = "call", ""
            elif value == END:
                close_assistant()
                state = "between"
            elif value == TOOL_RESULT:   # the engine appended a result without a closing <|end|>
                close_assistant()
                state, buf = "result", ""
            # other specials inside content are dropped
        elif state == "call":
            if value == END:
                calls.append(buf)
                buf = ""
                state = "after_call"
            elif value == TOOL_CALL:
                calls.append(buf)
                buf = ""
        elif state == "after_call":
            if value == TOOL_CALL:
                state, buf = "call", ""
            elif value == TOOL_RESULT:
                close_assistant()
                state, buf = "result", ""
            elif value == ASSISTANT:  # model went on without a result
                close_assistant()
                state = "content"
            else:
                close_assistant()
                state = "between"
        elif state == "result":
            if value == END:
                messages.append({"role": "tool", "content": buf})
                buf = ""
                state = "between"
        elif state == "between":
            if value == ASSISTANT:
                state = "content"
            elif value == TOOL_RESULT:
                state, buf = "result", ""
            else:
                break
    # the ids ran out mid-turn (max_new_tokens): keep what was written
    if state == "content" and (content or calls):
        close_assistant()
    elif state in ("call", "after_call"):
        if state == "call":
            calls.append(buf)
        close_assistant()
    elif state == "result":
        messages.append({"role": "tool", "content": buf})
    return messages


def parse_assistant(tok, ids) -> dict:
    """The first assistant turn of generated ids -> {"role": "assistant", "content", "tool_calls"?}."""
    for m in parse_completion(tok, ids):
        if m["role"] == "assistant":
            return m
    return {"role": "assistant", "content": ""}


def final_answer(messages: list[dict]) -> str:
    """The text of the last assistant message (what verifiers grade)."""
    for m in reversed(messages):
        if m.get("role") == "assistant" and (m.get("content") or not m.get("tool_calls")):
            return m.get("content") or ""
    return ""
