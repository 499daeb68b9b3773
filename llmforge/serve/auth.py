"""API keys and who a request belongs to.

    llmforge serve runs/cpu --api-key alice=sk-alice-123 --api-key sk-bob-456
    LLMFORGE_API_KEYS="alice=sk-alice-123,sk-bob-456" llmforge serve runs/cpu --host 0.0.0.0

Each key is a user: `NAME=KEY` names the user NAME; a bare KEY becomes the user
`key-<first 8 hex of its sha256>` (the key itself is never stored or logged). Clients send
`Authorization: Bearer KEY` (what the `openai` client does with api_key=KEY) or `X-API-Key: KEY`.

Without keys every request is the single user "local", and the server only answers on the
loopback interface with a loopback Host header (so a web page elsewhere cannot reach it, not
even through DNS rebinding).

Rate limits (`serve.rate_limit_rpm`, `serve.rate_limit_burst`): each user has a token bucket
that holds up to `burst` requests and refills at `rpm` per minute; a generation request (chat or
completions; n choices cost n) that finds too few tokens is a 429 `rate_limit_exceeded` whose
Retry-After says when there will be enough.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
import time

from fastapi import Request

from llmforge.errors import UserError
from llmforge.serve.protocol import APIError

LOCAL_USER = "local"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def parse_keys(*specs: str | list[str] | None) -> dict[str, str]:
    """{key: user} from comma-separated strings or lists of `KEY` / `NAME=KEY` entries."""
    keys: dict[str, str] = {}
    for spec in specs:
        if not spec:
            continue
        entries = spec.split(",") if isinstance(spec, str) else [e for s in spec for e in s.split(",")]
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            name, _, key = entry.partition("=")
            if not (re.fullmatch(r"[A-Za-z][\w.-]{0,31}", name) and len(key) >= 8):   # a bare key (may hold "=")
                name, key = "", entry
            if len(key) < 8:
                raise UserError(f"API key {key[:2]}… is shorter than 8 characters; use a long random key "
                                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
            keys[key] = name.strip() or f"key-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return keys


def keys_from_env() -> str:
    return os.environ.get("LLMFORGE_API_KEYS", "")


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def current_user(request: Request) -> str:
    """FastAPI dependency: the user of this request, or 401."""
    keys: dict[str, str] = request.app.state.api_keys
    if not keys:
        user = LOCAL_USER
    else:
        given = (presented_key(request) or "").encode()
        user = None
        for key, name in keys.items():   # compare with every key in constant time
            if hmac.compare_digest(given, key.encode()):
                user = name
        if user is None:
            raise APIError(401, "missing or wrong API key; send `Authorization: Bearer YOUR_KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    request.state.user = user
    return user


class RateLimiter:
    """A token bucket per user: `burst` requests at once, refilled at `rpm` per minute (0 = no limit)."""

    def __init__(self, rpm: float, burst: int = 0, clock=time.monotonic):
        if rpm < 0 or burst < 0:
            raise UserError(f"serve.rate_limit_rpm ({rpm}) and serve.rate_limit_burst ({burst}) must be >= 0")
        self.rate = rpm / 60.0                        # tokens per second
        self.capacity = float(burst or max(1, math.ceil(rpm / 6)))   # default burst: 10 s worth, at least 1
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}   # user -> (tokens, time they were counted)
        self.lock = threading.Lock()

    def take(self, user: str, cost: int = 1) -> None:
        """Spend `cost` of the user's tokens, or raise a 429 that says when to retry."""
        if not self.rate:
            return
        with self.lock:
            now = self.clock()
            tokens, then = self.buckets.get(user, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - then) * self.rate)
            if cost > self.capacity:
                self.buckets[user] = (tokens, now)
                raise APIError(429, f"this request costs {cost} requests of your rate limit, more than its burst of "
                                    f"{self.capacity:g}; ask for fewer choices (n)", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": "60"})
            if tokens < cost:
                self.buckets[user] = (tokens, now)
                retry = max(1, math.ceil((cost - tokens) / self.rate))
                raise APIError(429, f"rate limit of {self.rate * 60:g} requests per minute reached for user "
                                    f"'{user}'; retry in {retry} s", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
            self.buckets[user] = (tokens - cost, now)
