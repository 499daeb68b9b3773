"""API keys and tenancy: two users on one server see only their own conversations, ratings
and edits; no key (or a wrong one) is a 401; export records and filters by user."""
import json

import httpx
import pytest
from openai import OpenAI

from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.auth import RateLimiter, parse_keys
from llmforge.serve.feedback import export_pairs
from llmforge.serve.tiny import make_tiny_checkpoint
from llmforge.errors import UserError

HI = [{"role": "user", "content": "hi"}]
ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=256)
    server = load_served(run, cfg=ServeConfig(max_batch=4, batch_wait_ms=5), db=str(run / "feedback.sqlite"))
    url, stop = run_in_thread(create_app(server, api_keys=f"alice={ALICE},{BOB}"))
    yield server, url
    stop()
    server.close()


def as_user(url, key):
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_keys_parse_into_users():
    keys = parse_keys("alice=sk-alice-0123456789, sk-bob-0123456789", ["carol=abcdefghij=="])
    assert keys["sk-alice-0123456789"] == "alice" and keys["abcdefghij=="] == "carol"
    assert keys["sk-bob-0123456789"].startswith("key-") and "sk-bob" not in keys["sk-bob-0123456789"]
    with pytest.raises(UserError, match="shorter than 8"):
        parse_keys("short")


def test_no_key_or_a_wrong_key_is_401(served):
    server, url = served
    for headers in ({}, {"Authorization": "Bearer nope-nope-nope"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url + "/v1/chat/completions", headers=headers,
                       json={"model": server.model_name, "messages": HI})
        assert r.status_code == 401
    assert httpx.get(url + "/health").status_code == 200   # liveness stays open
    client = OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
    assert [m.id for m in client.models.list()] == [server.model_name]
    assert httpx.get(url + "/v1/models", headers={"X-API-Key": BOB}).status_code == 200


def test_users_cannot_see_or_touch_each_others_feedback(served, tmp_path):
    server, url = served
    alice, bob = as_user(url, ALICE), as_user(url, BOB)
    conv = alice.post("/v1/feedback/conversations", json={"title": "alice's secret"}).json()["id"]
    r = alice.post("/v1/chat/completions", json={"model": server.model_name, "messages": HI, "max_tokens": 4,
                                                  "conversation_id": conv})
    gen = r.json()["llmforge"]["generation_ids"][0]
    assert alice.post("/v1/feedback/edits", json={"generation_id": gen, "content": "Hello!"}).status_code == 200
    assert alice.post("/v1/feedback/ratings", json={"generation_id": gen, "value": 1}).status_code == 200

    assert [c["id"] for c in alice.get("/v1/feedback/conversations").json()["data"]] == [conv]
    assert bob.get("/v1/feedback/conversations").json()["data"] == []
    for r in (bob.get(f"/v1/feedback/conversations/{conv}"), bob.get(f"/v1/feedback/generations/{gen}"),
              bob.post("/v1/feedback/ratings", json={"generation_id": gen, "value": -1}),
              bob.post("/v1/feedback/edits", json={"generation_id": gen, "content": "poison"}),
              bob.post("/v1/feedback/choices", json={"generation_id": gen}),
              bob.post("/v1/chat/completions", json={"model": server.model_name, "messages": HI, "max_tokens": 2,
                                                     "conversation_id": conv})):
        assert r.status_code == 404, r.text
        assert "alice" not in r.text
    g = alice.get(f"/v1/feedback/generations/{gen}").json()
    assert g["rating"] == 1 and g["edits"] == [{"content": "Hello!", "kept": True}]

    bob_conv = bob.post("/v1/feedback/conversations", json={"title": "bob"}).json()["id"]
    r = bob.post("/v1/chat/completions", json={"model": server.model_name, "messages": HI, "max_tokens": 4,
                                                "conversation_id": bob_conv})
    bob_gen = r.json()["llmforge"]["generation_ids"][0]
    bob.post("/v1/feedback/edits", json={"generation_id": bob_gen, "content": "Bob's better answer"})
    out = tmp_path / "prefs.jsonl"
    export_pairs(server.store, out)
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {p["user"] for p in pairs} == {"alice", parse_keys(BOB)[BOB]}
    export_pairs(server.store, out, users=["alice"])
    only = [json.loads(line) for line in out.read_text().splitlines()]
    assert only and all(p["user"] == "alice" for p in only)
    export_pairs(server.store, out, max_per_user=0)
    assert out.read_text() == ""


def test_keyed_server_accepts_any_host_but_not_cross_origin_posts(served):
    server, url = served
    alice = as_user(url, ALICE)
    assert alice.get("/v1/models", headers={"Host": "llm.example.org"}).status_code == 200
    r = alice.post("/v1/feedback/conversations", json={"title": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


def test_store_file_is_owner_only(served):
    import os
    import stat
    server, _ = served
    mode = stat.S_IMODE(os.stat(server.store.url).st_mode)
    assert mode == 0o600, oct(mode)


def test_start_up_log_states_binding_and_sandbox_mode(served):
    from llmforge.infer.tools import sandbox_isolation
    from llmforge.serve.api import startup_lines

    server, _ = served
    host, lines = startup_lines(server, {}, "0.0.0.0")
    assert host == "127.0.0.1" and any("binding to 127.0.0.1" in line for line in lines)
    tools = next(line for line in lines if line.startswith("tools:"))
    assert ("FALLBACK" in tools) == (sandbox_isolation() != "namespaces")
    assert any(line.startswith("tools: tool cgroup: ") for line in lines)   # which one, or NONE and why
    host, lines = startup_lines(server, parse_keys(ALICE), "0.0.0.0")
    assert host == "0.0.0.0" and "1 API key" in lines[0] and ALICE not in " ".join(lines)


def test_rate_limit_is_a_token_bucket_per_user():
    now = [0.0]
    limiter = RateLimiter(rpm=60, burst=2, clock=lambda: now[0])   # 1 request/s, 2 at once
    limiter.take("alice")
    limiter.take("alice")
    with pytest.raises(Exception) as e:
        limiter.take("alice")
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded" and e.value.headers["Retry-After"] == "1"
    limiter.take("bob")            # another user has a bucket of their own
    now[0] = 1.0                   # one second refills one request, no more
    limiter.take("alice")
    with pytest.raises(Exception):
        limiter.take("alice")
    with pytest.raises(Exception, match="more than its burst"):
        limiter.take("carol", cost=3)
    RateLimiter(rpm=0).take("anyone", cost=10**6)   # 0 = no limit
    with pytest.raises(UserError, match="rate_limit_rpm"):
        RateLimiter(rpm=-1)


def test_a_user_over_the_rate_limit_gets_an_openai_429_and_others_do_not(served, monkeypatch):
    server, url = served
    monkeypatch.setattr(server, "limiter", RateLimiter(rpm=1, burst=2))
    alice, bob = as_user(url, ALICE), as_user(url, BOB)
    body = {"model": server.model_name, "messages": HI, "max_tokens": 1}
    assert alice.post("/v1/chat/completions", json={**body, "n": 2}).status_code == 200   # n choices cost n
    r = alice.post("/v1/completions", json={"model": server.model_name, "prompt": "a", "max_tokens": 1})
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded" and "alice" in err["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    client = OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0)
    import openai
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=1)
    assert bob.post("/v1/chat/completions", json=body).status_code == 200
    assert alice.get("/v1/models").status_code == 200   # only generation is limited
