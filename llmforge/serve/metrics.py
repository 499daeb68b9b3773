"""Prometheus metrics at GET /metrics, named like vLLM's server exposes them (with an
`llmforge:` prefix instead of `vllm:`), in the text format `prometheus_client` writes.

    curl -s localhost:8000/metrics | grep llmforge:time_to_first_token_seconds

Counters read from the engine at scrape time (tokens, requests, errors) plus histograms the
server observes as it goes: time to first token, inter-token latency, end-to-end latency, HTTP
request duration, tool-call duration. Each app has its own registry (tests run several).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/v1/engine/stats",
                "/v1/feedback/conversations", "/v1/feedback/ratings", "/v1/feedback/edits", "/v1/feedback/choices",
                "/v1/feedback/generations", "/openapi.json", "/docs")


def _route(path: str) -> str:
    """A bounded label: known routes (ids dropped), '/' for the web chat, else 'other'."""
    for known in _KNOWN_PATHS:
        if path == known or path.startswith(known + "/"):
            return known
    return "/" if path in ("/", "/index.html", "/app.js", "/style.css") else "other"


class _EngineCollector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        s = self.server.engine.stats
        for name, value, doc in (("prompt_tokens", s.prefill_tokens, "prefill tokens processed"),
                                 ("generation_tokens", s.generated_tokens, "tokens sampled"),
                                 ("engine_requests", s.requests, "engine requests admitted"),
                                 ("engine_request_errors", s.request_errors, "engine requests ended alone by an error"),
                                 ("tool_calls", s.tool_calls, "built-in tool calls started"),
                                 ("engine_steps", s.steps, "engine steps")):
            c = CounterMetricFamily(f"llmforge:{name}", doc)
            c.add_metric([], value)
            yield c
        engine = self.server.engine
        for name, value, doc in (("num_requests_running", len(engine.active), "rows decoding"),
                                 ("num_requests_waiting", len(engine.waiting), "requests queued for a slot"),
                                 ("num_requests_parked", len(engine.parked), "rows waiting for a tool result"),
                                 ("mean_decode_batch_size", s.decode_rows / s.decode_batches if s.decode_batches else 0.0,
                                  "mean rows per decode step since start"),
                                 ("step_errors", self.server.scheduler.errors, "steps that failed as a whole")):
            g = GaugeMetricFamily(f"llmforge:{name}", doc)
            g.add_metric([], value)
            yield g


class Metrics:
    def __init__(self, server):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(server))
        self.http_requests = Counter("llmforge:http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=self.registry)
        self.http_errors = Counter("llmforge:request_errors", "error responses by route and status",
                                   ["route", "status"], registry=self.registry)
        self.http_seconds = Histogram("llmforge:http_request_duration_seconds", "HTTP request duration",
                                      ["route"], buckets=_LATENCY, registry=self.registry)
        self.ttft = Histogram("llmforge:time_to_first_token_seconds", "submit to first token", buckets=_LATENCY,
                              registry=self.registry)
        self.itl = Histogram("llmforge:inter_token_latency_seconds", "time between tokens of one request",
                             buckets=_LATENCY, registry=self.registry)
        self.e2e = Histogram("llmforge:e2e_request_latency_seconds", "submit to last token", buckets=_LATENCY,
                             registry=self.registry)
        self.tool_seconds = Histogram("llmforge:tool_call_duration_seconds", "built-in tool call duration",
                                      ["tool"], buckets=_LATENCY, registry=self.registry)
        server.observer = self
        server.on_tool_call = lambda name, seconds: self.tool_seconds.labels(
            name if name in ("calculator", "python") else "other").observe(seconds)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = _route(path)
        self.http_requests.labels(route, str(status)).inc()
        if status >= 400:
            self.http_errors.labels(route, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)

    async def endpoint(self, request):
        from starlette.responses import Response
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
