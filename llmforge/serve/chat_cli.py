"""`llmforge chat CKPT_OR_RUN`: a terminal chat that streams the answer as it is sampled.

Commands typed at the prompt: /reset (new conversation), /system TEXT (set a system message),
/quit (or Ctrl-D). The built-in tools (calculator, Python sandbox) run when the model calls them.
"""
from __future__ import annotations

import sys


def chat_cli(checkpoint_or_run, *, temperature: float = 0.8, top_p: float = 0.95, max_tokens: int = 256,
             stdin=None, stdout=None) -> None:
    from llmforge.infer.engine import Engine
    from llmforge.infer.sampling import SamplingParams
    from llmforge.infer.tools import run_tool
    from llmforge.serve.scheduler import SERVE_STOPS
    from llmforge.tokenizer.chat import SPECIALS, final_answer, parse_completion, render_prompt
    from llmforge.train.checkpoint import load_model, load_tokenizer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, config, folder = load_model(checkpoint_or_run)
    tok = load_tokenizer(folder)
    engine = Engine(model, tok, max_batch=1, tool_runner=run_tool)
    stops = [tok.token_id(s) for s in SERVE_STOPS]
    specials = {tok.token_id(s) for s in SPECIALS}
    context = model.cfg.max_seq_len
    print(f"chatting with {folder} ({config.get('kind')}, step {config.get('step', '?')}); "
          "/reset, /system TEXT, /quit", file=stdout, flush=True)
    messages: list[dict] = []
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/quit":
            return
        if text.strip() == "/reset":
            messages = []
            print("(new conversation)", file=stdout, flush=True)
            continue
        if text.startswith("/system "):
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": text[len("/system "):]})
            continue
        messages.append({"role": "user", "content": text})
        prompt = render_prompt(tok, messages)
        while len(prompt) >= context - 8 and len(messages) > 1:   # forget the oldest turns to fit the context
            messages.pop(1 if messages[0]["role"] == "system" else 0)
            prompt = render_prompt(tok, messages)
        if len(prompt) >= context - 8:
            print("(that message is longer than the model's context; try a shorter one)", file=stdout, flush=True)
            messages.pop()
            continue
        params = SamplingParams(max_tokens=min(max_tokens, context - len(prompt)), temperature=temperature,
                                top_p=top_p, stop_token_ids=stops, execute_tools=True)
        rid = engine.add(prompt, params)
        print("assistant> ", end="", file=stdout, flush=True)
        shown, completion = 0, None
        try:
            while completion is None:
                for ev in engine.step():
                    if ev.request_id != rid:
                        continue
                    visible = _visible(tok, ev.completion.tokens, specials)
                    if not ev.finished:
                        visible = visible.rstrip("\ufffd")   # half of a multi-byte character
                    if len(visible) > shown:
                        print(visible[shown:], end="", file=stdout, flush=True)
                        shown = len(visible)
                    if ev.finished:
                        completion = ev.completion
        except KeyboardInterrupt:   # Ctrl-C stops this answer, not the chat
            engine.cancel(rid)
            print(" [stopped]", file=stdout, flush=True)
            messages.pop()
            continue
        print(file=stdout, flush=True)
        answer = final_answer(parse_completion(tok, completion.tokens)) or completion.text
        messages.append({"role": "assistant", "content": answer})


def _visible(tok, tokens: list[int], specials: set[int]) -> str:
    """The answer as a reader should see it: words, and each tool run as [name(args) -> result].
    A call or result still being written is held back, so what is shown only ever grows."""
    from llmforge.tokenizer.chat import parse_completion

    tool_call, tool_result = tok.token_id("<|tool_call|>"), tok.token_id("<|tool_result|>")
    last_special = next((t for t in reversed(tokens) if t in specials), None)
    if last_special in (tool_call, tool_result):   # a call or result still open: show up to its start
        tokens = tokens[:len(tokens) - 1 - tokens[::-1].index(last_special)]
    if tool_call not in tokens:
        return tok.decode([t for t in tokens if t not in specials])
    parts = []
    for m in parse_completion(tok, tokens):
        if m["role"] == "assistant":
            parts.append(m.get("content") or "")
            parts += [f"\n[{c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls") or []]
        elif m["role"] == "tool":
            parts.append(f" -> {m['content']}]\n")
    return "".join(parts)
