"""`llmforge chat CKPT_OR_RUN`: a terminal chat that streams the answer as it is sampled.

Commands typed at the prompt: /reset (new conversation), /system TEXT (set a system message),
/quit (or Ctrl-D). The built-in tools (calculator, Python sandbox) run when the model calls them.
"""
from __future__ import annotations

import sys
import time


def chat_cli(checkpoint_or_run, *, temperature: float = 0.8, top_p: float = 0.95, max_tokens: int = 256,
             stdin=None, stdout=None, inference=None, speculate: int = 0, compile: bool = False) -> None:
    """`inference`: an already loaded (model, config, folder), e.g. at `--dtype int8`."""
    from llmforge.infer.engine import Engine
    from llmforge.infer.sampling import SamplingParams
    from llmforge.infer.tools import run_tool
    from llmforge.serve.scheduler import SERVE_STOPS
    from llmforge.tokenizer.chat import final_answer, parse_completion, render_prompt
    from llmforge.train.checkpoint import load_model, load_tokenizer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, config, folder = inference or load_model(checkpoint_or_run)
    tok = load_tokenizer(folder)
    engine = Engine(model, tok, max_batch=1, tool_runner=run_tool, speculate=speculate, compile=compile)
    stops = [tok.token_id(s) for s in SERVE_STOPS]
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
        # forget the oldest turns (never the system prompt or this message) until the answer has
        # room: a quarter of the context, at least 64 tokens (the tasks' longest answers)
        room, keep, forgot = min(max_tokens, max(64, context // 4)), 2 if messages[0]["role"] == "system" else 1, 0
        while len(prompt) > context - room and len(messages) > keep:
            messages.pop(keep - 1)
            forgot += 1
            prompt = render_prompt(tok, messages)
        if forgot:
            print(f"(forgot the {forgot} oldest message{'s' * (forgot > 1)} to fit the model's {context}-token "
                  "context; /reset starts afresh)", file=stdout, flush=True)
        if len(prompt) >= context - 8:
            print("(that message is longer than the model's context; try a shorter one)", file=stdout, flush=True)
            messages.pop()
            continue
        params = SamplingParams(max_tokens=min(max_tokens, context - len(prompt)), temperature=temperature,
                                top_p=top_p, stop_token_ids=stops, execute_tools=True, chat=True)
        rid = engine.add(prompt, params)
        print("assistant> ", end="", file=stdout, flush=True)
        try:
            completion = stream_reply(engine, rid, stdout)
        except KeyboardInterrupt:   # Ctrl-C stops this answer, not the chat
            engine.cancel(rid)
            print(" [stopped]", file=stdout, flush=True)
            messages.pop()
            continue
        print(file=stdout, flush=True)
        answer = final_answer(parse_completion(tok, completion.tokens)) or completion.text
        messages.append({"role": "assistant", "content": answer})


def stream_reply(engine, rid: int, stdout):
    """Step the engine until request `rid` ends, printing the engine's streaming deltas of the
    reply and each tool run as `[name(args) -> result]`; returns the Completion."""
    from llmforge.serve.protocol import tool_calls_and_runs

    runs_shown = 0
    while True:
        events = engine.step()
        if not events and engine.parked:   # only the tool is running
            time.sleep(0.005)
        for ev in events:
            if ev.request_id != rid:
                continue
            if ev.completion.tool_calls_run > runs_shown:   # a tool ran since the last event
                _, runs = tool_calls_and_runs(engine.tok, ev.completion.tokens)
                for run in runs[runs_shown:]:
                    print(f"\n[{run['name']}({run['arguments']}) -> {run['result'].rstrip()}]\n", end="", file=stdout)
                runs_shown = len(runs)
            print(ev.text_delta, end="", file=stdout, flush=True)
            if ev.finished:
                return ev.completion
