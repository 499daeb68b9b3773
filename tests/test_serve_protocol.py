"""OpenAI fields that either work or are refused: list and token-id prompts, echo, best_of,
suffix; `refusal` in messages; /metrics in Prometheus' text format."""
import json

import httpx
import pytest
from openai import OpenAI

from llmforge.config import ServeConfig
from llmforge.serve.api import create_app, load_served, run_in_thread
from llmforge.serve.tiny import make_tiny_checkpoint

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    make_tiny_checkpoint(run / "ckpt" / "sft", max_seq_len=256)
    server = load_served(run, cfg=ServeConfig(max_batch=8, batch_wait_ms=5), db=str(run / "feedback.sqlite"))
    url, stop = run_in_thread(create_app(server))
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield server, url, client
    stop()
    server.close()


def test_list_and_token_prompts_number_choices_like_openai(served):
    server, _, client = served
    r = client.completions.create(model=server.model_name, prompt=["def add(a, b):", "The quick"], n=2,
                                  max_tokens=4, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    one = client.completions.create(model=server.model_name, prompt="The quick", max_tokens=4, seed=1)
    assert r.choices[2].text == one.choices[0].text           # prompt 1, choice 0 = the same request alone
    ids = [server.tok.eot_id] + server.tok.encode("The quick")
    tok_r = client.completions.create(model=server.model_name, prompt=ids, max_tokens=4, seed=1)
    assert tok_r.choices[0].text == one.choices[0].text
    streamed = list(client.completions.create(model=server.model_name, prompt=["a", "b"], max_tokens=3,
                                              stream=True))
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1}


def test_echo_best_of_and_suffix(served):
    server, url, client = served
    r = client.completions.create(model=server.model_name, prompt="def add", max_tokens=4, echo=True, seed=2)
    assert r.choices[0].text.startswith("def add")
    best = client.completions.create(model=server.model_name, prompt="The", max_tokens=4, best_of=4, n=1,
                                     temperature=1.0)
    assert len(best.choices) == 1
    for body, param in (({"suffix": "return x"}, "suffix"), ({"best_of": 1, "n": 2}, "best_of"),
                        ({"echo": True, "logprobs": 2}, "echo"), ({"prompt": [999999]}, "prompt"),
                        ({"prompt": []}, "prompt"), ({"best_of": 3, "stream": True}, "best_of")):
        r = httpx.post(url + "/v1/completions", json={"model": server.model_name, "prompt": "x", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_messages_carry_refusal_and_answers_pass_back(served):
    server, _, client = served
    r = client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=4)
    assert r.choices[0].message.refusal is None and "refusal" in r.choices[0].message.model_dump()
    # a response message sent back as-is (with refusal/annotations fields) is accepted
    back = HI + [r.choices[0].message.model_dump()] + [{"role": "user", "content": "more"}]
    again = client.chat.completions.create(model=server.model_name, messages=back, max_tokens=3)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_metrics_parse_as_prometheus_text(served):
    from prometheus_client.parser import text_string_to_metric_families

    server, url, client = served
    list(client.chat.completions.create(model=server.model_name, messages=HI, max_tokens=5, stream=True))
    httpx.post(url + "/v1/chat/completions", json={"model": server.model_name, "messages": HI, "n": 0})
    text = httpx.get(url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("llmforge:time_to_first_token_seconds", "llmforge:inter_token_latency_seconds",
                 "llmforge:e2e_request_latency_seconds", "llmforge:generation_tokens", "llmforge:num_requests_waiting",
                 "llmforge:num_requests_running", "llmforge:http_requests", "llmforge:request_errors",
                 "llmforge:tool_call_duration_seconds", "llmforge:mean_decode_batch_size"):
        assert name in families, (name, sorted(families))
    count = next(s.value for s in families["llmforge:time_to_first_token_seconds"].samples
                 if s.name.endswith("_count"))
    assert count >= 1
    errors = [s for s in families["llmforge:request_errors"].samples
              if s.labels.get("status") == "400" and s.name.endswith("_total")]
    assert errors and errors[0].value >= 1
    assert json.loads(httpx.get(url + "/health").text)["status"] == "ok"
