"""The server's edge: every bad input is an OpenAI-shaped 4xx, one request's failure ends that
request alone, and an honest stream running meanwhile is never harmed."""
import json
import logging
import threading
import time

import httpx
import pytest

from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.tiny import make_tiny_checkpoint

HI = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=256)
    server = load_served(run, cfg=ServeConfig(max_batch=8, batch_wait_ms=5, max_body_bytes=1 << 20),
                         db=str(run / "feedback.sqlite"))
    url, stop = run_in_thread(create_app(server))
    yield server, url
    stop()
    server.close()


class HonestStream(threading.Thread):
    """A well-formed streaming chat request that runs while the bad ones arrive."""

    def __init__(self, url, model, max_tokens=120):
        super().__init__(daemon=True)
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.events, self.error = [], None

    def run(self):
        body = {"model": self.model, "messages": HI, "max_tokens": self.max_tokens, "stream": True,
                "temperature": 0, "seed": 1}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        self.events.append(json.loads(line[6:]))
        except Exception as e:  # reported by healthy()
            self.error = e

    def healthy(self) -> bool:
        self.join(timeout=120)
        finishes = [c["choices"][0]["finish_reason"] for c in self.events if c.get("choices")]
        return (self.error is None and not any("error" in e for e in self.events)
                and finishes[-1] in ("stop", "length"))


def assert_openai_error(r, status, param="any"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "any":
        assert err["param"] == param, err


def deep(n):
    return '{"model": "m", "messages": ' + "[" * n + "]" * n + "}"


BAD = [
    ({"seed": 2 ** 70}, 400, "seed"),
    ({"seed": 2 ** 53}, 400, "seed"),   # past 2**53 - 1 a double-reading client would send another number
    ({"seed": "7"}, 400, "seed"),
    ({"seed": 7.5}, 400, "seed"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": -0.1}, 400, "top_p"),
    ({"n": 0}, 400, "n"),
    ({"n": 10 ** 6}, 400, "n"),
    ({"top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"stream_options": "yes"}, 400, "stream_options"),
    ({"metadata": "x"}, 400, "metadata"),
    ({"tool_choice": "banana"}, 400, "tool_choice"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"frequency_penalty": 3.0}, 400, "frequency_penalty"),
    ({"logit_bias": {"not-an-id": 5}}, 400, "logit_bias"),
    ({"logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"not_an_openai_field": 1}, 400, "not_an_openai_field"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 900_000}]}, 400, "messages"),
]


@pytest.mark.parametrize("patch,status,param", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_chat_fields_are_openai_400s_and_an_honest_stream_survives(served, patch, status, param):
    server, url = served
    honest = HonestStream(url, server.model_name, max_tokens=40)
    honest.start()
    r = httpx.post(url + "/v1/chat/completions", json={"model": server.model_name, "messages": HI, **patch},
                   timeout=60)
    assert_openai_error(r, status, param)
    assert honest.healthy()


def test_whole_floats_are_integers_as_in_json_schema_and_edits_need_more_than_whitespace(served):
    server, url = served
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={"model": server.model_name, "messages": HI,
                                                                   "seed": 7.0, "top_k": 3.0, "max_tokens": 2.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
    r = httpx.post(url + "/v1/completions", json={"model": server.model_name, "prompt": [1.0, 2], "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    # the schema says so (pattern \S) as well as the store: a whitespace edit is a 400 naming the field
    assert_openai_error(httpx.post(url + "/v1/feedback/edits", json={"generation_id": "g", "content": " \n"}),
                        400, "content")


RAW = [
    ('{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}', "/v1/chat/completions", 400,
     "messages"),
    ('{"model": "MODEL", "prompt": "a\\udfff"}', "/v1/completions", 400, "prompt"),
    (deep(100_000), "/v1/chat/completions", 400, None),
    (deep(2_000), "/v1/chat/completions", 400, "any"),
    ("{not json", "/v1/chat/completions", 400, None),
    ("[1, 2]", "/v1/chat/completions", 400, None),
    ('"just a string"', "/v1/completions", 400, None),
    ("", "/v1/chat/completions", 400, "any"),
]


@pytest.mark.parametrize("raw,path,status,param", RAW, ids=[r[0][:30] for r in RAW])
def test_malformed_bodies_are_openai_400s(served, raw, path, status, param):
    server, url = served
    honest = HonestStream(url, server.model_name, max_tokens=30)
    honest.start()
    r = httpx.post(url + path, content=raw.replace("MODEL", server.model_name).encode("utf-8", "surrogatepass"),
                   headers=JSON, timeout=60)
    assert_openai_error(r, status, param)
    assert honest.healthy()


def test_top_p_zero_is_greedy_and_harms_no_one(served):
    server, url = served
    honest = HonestStream(url, server.model_name)
    honest.start()
    base = {"model": server.model_name, "messages": HI, "max_tokens": 12}
    r = httpx.post(url + "/v1/chat/completions", json={**base, "top_p": 0, "temperature": 1.0, "seed": 3}, timeout=60)
    greedy = httpx.post(url + "/v1/chat/completions", json={**base, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
    c = httpx.post(url + "/v1/completions", json={"model": server.model_name, "prompt": "def", "top_p": 0,
                                                  "max_tokens": 5}, timeout=60)
    assert c.status_code == 200, c.text
    assert honest.healthy()


def test_an_exception_in_one_requests_sampling_ends_it_alone(served, monkeypatch):
    server, url = served
    engine = server.engine
    real = engine._advance

    def advance(req, *args):   # a request with seed 666 blows up in its own row
        if req.params.seed == 666:
            raise RuntimeError("boom in sampling")
        return real(req, *args)

    monkeypatch.setattr(engine, "_advance", advance)
    honest = HonestStream(url, server.model_name)
    honest.start()
    time.sleep(0.2)
    r = httpx.post(url + "/v1/chat/completions", json={"model": server.model_name, "messages": HI, "seed": 666,
                                                       "max_tokens": 5}, timeout=60)
    assert_openai_error(r, 500)
    assert r.json()["error"]["code"] == "engine_error" and "boom" in r.json()["error"]["message"]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"model": server.model_name, "messages": HI, "seed": 666, "stream": True}) as s:
        lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert any("error" in x and x["error"]["code"] == "engine_error" for x in lines)
    assert honest.healthy()
    assert len(engine.free_slots) == engine.max_batch and not engine.has_work()


def test_an_unexpected_exception_is_a_json_500_with_a_request_id(served, monkeypatch, caplog):
    server, url = served

    def admit(k):
        raise KeyError("surprise")

    monkeypatch.setattr(server, "admit", admit)
    with caplog.at_level(logging.ERROR, logger="llmforge.serve"):
        r = httpx.post(url + "/v1/chat/completions", json={"model": server.model_name, "messages": HI}, timeout=60)
    assert_openai_error(r, 500)
    rid = r.headers["x-request-id"]
    assert rid in r.json()["error"]["message"] and rid in caplog.text and "surprise" in caplog.text


def test_http_errors_are_openai_shaped(served):
    server, url = served
    assert_openai_error(httpx.get(url + "/v1/nothing-here"), 404)
    r = httpx.get(url + "/v1/chat/completions")
    assert_openai_error(r, 405)
    assert r.headers["Allow"] == "POST"                      # RFC 9110: a 405 names the methods that work
    r = httpx.put(url + "/v1/models", json={})
    assert_openai_error(r, 405)
    assert r.headers["Allow"] == "GET"
    r = httpx.put(url + "/health")   # no JSON body either: still the 405, not the 415 of the CSRF rule
    assert_openai_error(r, 405)
    assert r.headers["Allow"] == "GET"
    # a conversation needs a JSON body ({} will do): a bare POST is what a cross-site form can send
    assert_openai_error(httpx.post(url + "/v1/feedback/conversations"), 415)
    assert httpx.post(url + "/v1/feedback/conversations", json={}).status_code == 200
    assert_openai_error(httpx.get(url + "/v1/models/gpt-9"), 404, "model")
    assert_openai_error(httpx.get(url + "/v1/feedback/conversations/conv-nope"), 404)
    assert_openai_error(httpx.post(url + "/v1/chat/completions", content=b"{}", headers={"Content-Type": "text/plain"}),
                        415)
    assert_openai_error(httpx.post(url + "/v1/feedback/conversations", content=b"title=x",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)


def test_cross_origin_and_foreign_host_posts_are_refused(served):
    server, url = served
    body = {"title": "csrf"}
    before = len(server.store.conversations())
    r = httpx.post(url + "/v1/feedback/conversations", json=body, headers={"Origin": "http://evil.example"})
    assert_openai_error(r, 403)
    # DNS rebinding: a page whose own name resolves to 127.0.0.1 (no keys = loopback names only)
    r = httpx.post(url + "/v1/feedback/conversations", json=body, headers={"Host": "evil.example:80"})
    assert_openai_error(r, 403)
    assert len(server.store.conversations()) == before
    own = url.replace("http://", "")
    assert httpx.post(url + "/v1/feedback/conversations", json=body, headers={"Origin": url}).status_code == 200, own


def test_body_size_limit_is_413_and_the_server_stays_responsive(served):
    server, url = served
    honest = HonestStream(url, server.model_name, max_tokens=30)
    honest.start()
    big = json.dumps({"model": server.model_name, "messages": [{"role": "user", "content": "x" * (3 << 20)}]})
    start = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", content=big.encode(), headers=JSON, timeout=60)
    assert_openai_error(r, 413)
    assert time.perf_counter() - start < 10

    def chunks():   # no Content-Length: the limit is counted as the body arrives
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(url + "/v1/chat/completions", content=chunks(), headers=JSON, timeout=60)
    assert_openai_error(r, 413)
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert honest.healthy()


def test_a_full_queue_is_429_with_retry_after(served, monkeypatch):
    server, url = served
    monkeypatch.setattr(server.cfg, "max_queue", 0)
    r = httpx.post(url + "/v1/chat/completions", json={"model": server.model_name, "messages": HI}, timeout=60)
    assert_openai_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1


def test_openapi_declares_the_request_bodies(served):
    _, url = served
    doc = httpx.get(url + "/openapi.json", timeout=60).json()   # built on first use: slow on a busy machine
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/feedback/ratings", "/v1/feedback/edits",
                 "/v1/feedback/conversations"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body, path
    for status in ("400", "401", "404", "413", "415", "429", "500"):   # every error status is documented
        assert doc["paths"]["/v1/chat/completions"]["post"]["responses"][status]["content"], status
    assert "error" in doc["components"]["schemas"]["ErrorBody"]["properties"]
    props = doc["components"]["schemas"]["ChatCompletionBody"]["properties"]
    assert {"messages", "temperature", "top_p", "seed", "tools", "stream_options"} <= set(props)



def test_logit_bias_and_penalties_steer_the_tokens(served):
    """OpenAI's logit_bias (+100 makes a token certain) and presence/frequency penalties reach the engine."""
    server, url = served
    base = {"model": server.model_name, "prompt": "def", "max_tokens": 12, "temperature": 0, "logprobs": 1}
    forced = next(i for i in range(server.vocab_size) if i not in server.stop_ids and i != server.tok.eot_id)
    r = httpx.post(url + "/v1/completions", json={**base, "logit_bias": {str(forced): 100}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == server.tok.decode([forced] * 12)

    def tokens(extra):
        r = httpx.post(url + "/v1/completions", json={**base, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["tokens"]
    plain, penalised = tokens({}), tokens({"presence_penalty": 2.0, "frequency_penalty": 2.0})
    assert len(set(plain)) < len(plain)                      # the tiny model repeats itself greedily
    assert len(set(penalised)) > len(set(plain))             # penalties make it use other tokens
