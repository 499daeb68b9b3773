"""API keys and who a request belongs to.

    llmforge serve runs/cpu --api-key alice=sk-alice-123 --api-key sk-bob-456
    LLMFORGE_API_KEYS="alice=sk-alice-123,sk-bob-456" llmforge serve runs/cpu --host 0.0.0.0

Each key is a user: `NAME=KEY` names the user NAME; a bare KEY becomes the user
`key-<first 8 hex of its sha256>` (the key itself is never stored or logged). Clients send
`Authorization: Bearer KEY` (what the `openai` client does with api_key=KEY) or `X-API-Key: KEY`.

Without keys every request is the single user "local", and the server only answers on the
loopback interface with a loopback Host header (so a web page elsewhere cannot reach it, not
even through DNS rebinding).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re

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
