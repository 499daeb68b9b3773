"""The OpenAI-compatible server, driven by the official `openai` client against 127.0.0.1 with a
tiny random model: plain, streaming, n > 1, JSON schema, tools, logprobs, batching, bad input,
client disconnects, feedback endpoints."""
import json
import re
import threading
import time

import httpx
import jsonschema
import pytest
from openai import OpenAI

from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.feedback import export_pairs
from llmforge.serve.tiny import make_tiny_checkpoint

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=512)
    server = load_served(run, cfg=ServeConfig(max_batch=8, batch_wait_ms=20), db=str(run / "feedback.sqlite"))
    url, stop = run_in_thread(create_app(server))
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield server, url, client
    stop()
    server.close()


def test_models_and_health(served):
    server, url, client = served
    assert [m.id for m in client.models.list()] == [server.model_name]
    assert server.model_name.endswith("-sft")          # run directory name + checkpoint kind
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and re.fullmatch(r"[\w.-]+-sft@[0-9a-f]{12}", health["checkpoint"])
    assert "/" not in json.dumps(health) and "/" not in json.dumps(client.models.list().model_dump())


def test_plain_and_streaming_agree(served):
    server, _, client = served
    kw = dict(model=server.model_name, messages=HI, max_tokens=12, temperature=0.9, seed=7)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_n_choices_and_logprobs(served):
    server, _, client = served
    r = client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=6, n=3, seed=1,
                                       logprobs=True, top_logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    for c in r.choices:
        lp = c.logprobs.content
        assert lp and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp)
        assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in lp)
    chunks = list(client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=4, n=2,
                                                 stream=True, seed=2))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_json_schema_output_validates(served):
    server, _, client = served
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["city", "n"]}
    r = client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=40, n=3, temperature=1.0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "place", "schema": schema}})
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    r = client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


def test_client_tools_come_back_as_tool_calls(served):
    server, _, client = served
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                              "required": ["city"]}}}]
    r = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "weather?"}],
                                       max_tokens=120, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    # the client runs the tool and sends the result back: the conversation continues
    follow = HI + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r2 = client.chat.completions.create(model=server.model_name, messages=follow, max_tokens=5, tools=tools,
                                        tool_choice="none")
    assert r2.choices[0].finish_reason in ("stop", "length") and not r2.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=120, tools=tools,
                                                 tool_choice="required", stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stop_strings_cut_the_text(served):
    server, _, client = served
    kw = dict(model=server.model_name, messages=HI, max_tokens=20, temperature=1.0)
    for seed in range(20):
        text = client.chat.completions.create(**kw, seed=seed).choices[0].message.content
        if len(text) >= 4:
            break
    stop = text[2:4]
    r = client.chat.completions.create(**kw, seed=seed, stop=[stop])
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_legacy_completions(served):
    server, _, client = served
    r = client.completions.create(model=server.model_name, prompt="def add(a, b):", max_tokens=8, seed=3)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.model_name, prompt="def add(a, b):", max_tokens=8, seed=3, stream=True))
    assert streamed == r.choices[0].text


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"model": "MODEL"}, 400, "messages"),
    ({"model": "gpt-9", "messages": HI}, 404, "model"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x " * 1200}]}, 400, "messages"),
    ({"model": "MODEL", "messages": HI, "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": HI, "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"model": "MODEL", "messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ({"model": "MODEL", "messages": HI, "conversation_id": "conv-nope"}, 404, "conversation_id"),
    ({"model": "MODEL", "messages": HI, "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}},
     400, "tool_choice"),
    ({"model": "MODEL", "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
])
def test_bad_requests_get_openai_error_bodies(served, body, status, param):
    _, url, _ = served
    server = served[0]
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body = {**body, "model": server.model_name}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_openai_client_sees_errors_as_exceptions(served):
    import openai
    server, _, client = served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "x " * 1200}])
    assert e.value.code == "context_length_exceeded"


def test_concurrent_requests_share_decode_batches(served):
    server, _, client = served
    before = dict(server.stats())
    results, errors = [], []

    def ask(i):
        try:
            results.append(client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=12,
                                                          seed=i, stop=None).choices[0].message.content)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.stats()
    assert not errors and len(results) == 6
    batched_steps = sum(v for k, v in after["steps_by_batch"].items() if k >= 2) - \
        sum(v for k, v in before["steps_by_batch"].items() if k >= 2)
    assert after["max_decode_batch"] >= 3 and batched_steps > 0, after


def test_disconnect_mid_stream_frees_the_engine(served):
    server, url, client = served
    body = {"model": server.model_name, "messages": HI, "max_tokens": 200, "stream": True, "temperature": 1.0,
            "stop": None}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.time() + 10
    while time.time() < deadline and (server.stats()["in_flight"] or server.engine.has_work()):
        time.sleep(0.05)
    assert server.stats()["in_flight"] == 0 and not server.engine.has_work()
    assert len(server.engine.free_slots) == server.engine.max_batch
    r = client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_feedback_round_trip_through_the_api(served, tmp_path):
    server, url, client = served
    conv = httpx.post(url + "/v1/feedback/conversations", json={"title": "t"}).json()["id"]
    r = client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=6, seed=5,
                                       extra_body={"conversation_id": conv})
    gen = r.model_extra["llmforge"]["generation_ids"][0]
    assert gen
    assert httpx.post(url + "/v1/feedback/edits", json={"generation_id": gen, "content": "Hello there!"}).status_code == 200
    assert httpx.post(url + "/v1/feedback/ratings", json={"generation_id": gen, "value": 1}).status_code == 200
    bad = httpx.post(url + "/v1/feedback/ratings", json={"generation_id": "gen-nope", "value": 1})
    assert bad.status_code == 404 and "unknown generation" in bad.json()["error"]["message"]
    g = httpx.get(url + f"/v1/feedback/generations/{gen}").json()
    assert g["model"] == server.model_name and g["checkpoint"] == server.checkpoint_id and g["rating"] == 1
    out = tmp_path / "prefs.jsonl"
    export_pairs(server.store, out)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(p["source"] == "edit" and p["chosen"] == "Hello there!" and p["prompt"] == HI for p in pairs)


def _forced_tool_reply(server, tool_runner):
    """An engine request whose reply is forced to: words, a calculator call, then (after the
    engine ran it and fed the result) more words."""
    from llmforge.infer.constrain import ForcedPrefix
    from llmforge.infer.engine import Engine
    from llmforge.infer.sampling import SamplingParams
    from llmforge.tokenizer.chat import render_prompt

    tok, sp = server.tok, server.tok.token_id
    call = '{"name":"calculator","arguments":{"expression":"2+2"}}'
    forced = (tok.encode("Let me compute. ") + [sp("<|tool_call|>")] + tok.encode(call) + [sp("<|end|>")] +
              tok.encode("It is 4.") + [sp("<|end|>")])
    engine = Engine(server.model, tok, max_batch=1, tool_runner=tool_runner)
    params = SamplingParams(max_tokens=len(forced) + 8, temperature=0, stop_token_ids=list(server.stop_ids),
                            execute_tools=True, chat=True)
    return engine, engine.add(render_prompt(tok, HI), params, ForcedPrefix(forced))


def test_builtin_tool_run_is_shown_as_content_and_tool_runs(served):
    """The engine's streaming deltas of a reply with a tool run add up to its content, which the
    client sees with the run beside it."""
    from llmforge.serve.api import Answer

    server, _, _ = served
    engine, rid = _forced_tool_reply(server, lambda name, args: "4")
    deltas, comp = [], None
    while comp is None:
        for ev in engine.step():
            deltas.append(ev.text_delta)
            comp = ev.completion if ev.finished else None
    assert comp.tool_calls_run == 1 and comp.finish_reason == "stop"
    assert "".join(deltas) == comp.text == "Let me compute. It is 4."
    assert all("<|" not in d and "calculator" not in d for d in deltas)
    content, calls, runs = Answer(server, None, 0).view(comp)
    assert content == "Let me compute. It is 4."
    assert calls == [] and runs == [{"name": "calculator", "arguments": '{"expression": "2+2"}', "result": "4"}]


def test_terminal_chat_shows_tool_runs_between_the_words(served):
    import io

    from llmforge.serve.chat_cli import stream_reply

    server, _, _ = served
    engine, rid = _forced_tool_reply(server, lambda name, args: "4")
    out = io.StringIO()
    comp = stream_reply(engine, rid, out)
    assert out.getvalue() == 'Let me compute. \n[calculator({"expression": "2+2"}) -> 4]\nIt is 4.'
    assert comp.text == "Let me compute. It is 4."


def test_terminal_chat_streams_and_keeps_history(served, tmp_path):
    import io

    from llmforge.serve.chat_cli import chat_cli

    server, _, _ = served
    out = io.StringIO()
    folder = server.folder
    chat_cli(folder, max_tokens=5, stdin=io.StringIO("hello\n/reset\nagain\n/quit\n"), stdout=out)
    text = out.getvalue()
    assert text.count("assistant> ") == 2 and "(new conversation)" in text


def test_a_client_that_stops_reading_does_not_block_others(served):
    server, url, client = served
    body = {"model": server.model_name, "messages": HI, "max_tokens": 300, "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30):   # opened, never read
        start = time.perf_counter()
        r = client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert time.perf_counter() - start < 20


def test_terminal_chat_forgets_the_oldest_turns_but_keeps_the_system_prompt(served, monkeypatch):
    import io

    from llmforge.serve import chat_cli as cli_mod
    from llmforge.tokenizer import chat as chat_mod

    server, _, _ = served
    seen = []
    real = chat_mod.render_prompt

    def spy(tok, messages):
        seen.append([m["role"] for m in messages])
        return real(tok, messages)

    monkeypatch.setattr(chat_mod, "render_prompt", spy)
    context = server.context
    per_word = len(server.tok.encode(" word"))
    long = " ".join(["word"] * (context // 3 // per_word))      # each turn a third of the context
    out = io.StringIO()
    cli_mod.chat_cli(server.folder, max_tokens=context // 2, stdin=io.StringIO(
        "/system Be brief.\n" + "".join(f"{long} {i}\n" for i in range(4)) + "/quit\n"), stdout=out)
    text = out.getvalue()
    assert text.count("assistant> ") == 4 and "oldest message" in text
    assert all(roles[0] == "system" and roles[-1] == "user" for roles in seen)   # never dropped
