"""The HTTP side of API keys (the core is `services.ingress.auth`): a middleware that authenticates and
rate-limits every request outside a short public list, the per-request tier and token checks, and
OpenAI-shaped refusals (401 with WWW-Authenticate, 403, 429 with Retry-After).

The Authorization header is read here and nowhere else; only the key's name travels on (budgets,
logs). With no keys configured nothing is checked and callers are told apart by `api_key_id`.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.config import AuthConfig
from services.control.client import api_key_id
from services.ingress.api import error_response
from services.ingress.auth import AuthError, KeyEntry, KeyRing, read_keys

# Open without a key: the health probe and the API's own description.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def load(cfg: AuthConfig) -> KeyRing | None:
    """The configured keys, or None when authentication is off."""
    keys = read_keys(cfg.api_keys_file, cfg.api_keys_env)
    return KeyRing(keys) if keys else None


def refusal(exc: AuthError) -> JSONResponse:
    resp = error_response(exc.status, exc.message, exc.type, exc.param, exc.code)
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="ponder"'
    if exc.retry_after is not None:
        resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


class ApiKeys:
    """ASGI middleware: once `app.state.auth` holds a KeyRing, every path but PUBLIC_PATHS needs a
    key (401), and each request counts against the key's request rate (429); the key then rides in
    the request's state. Pure ASGI, so nothing is buffered and streams pass straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ring = getattr(scope["app"].state, "auth", None) if scope["type"] == "http" else None
        if ring is None or _route_path(scope) in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            key = ring.authenticate(None if header is None else header.decode("latin-1"))
            ring.admit(key, time.monotonic())
        except AuthError as exc:
            await refusal(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the app routes on (without a route prefix the server mounted it under)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def install(app: FastAPI) -> None:
    """Add ApiKeys; call it last, so that it runs first."""
    app.add_middleware(ApiKeys)


def caller(request: Request) -> KeyEntry | None:
    """The authenticated key of this request; None when authentication is off."""
    return getattr(request.state, "api_key", None)


def key_id(request: Request) -> str:
    """Who the budgets count this request against: the key's name, else the anonymous hashed id."""
    key = caller(request)
    return key.name if key is not None else api_key_id(request.headers.get("authorization"))


def check_chat(ring: KeyRing | None, key: KeyEntry | None, tier: str) -> JSONResponse | None:
    """403 for a tier the key may not use, 429 when its tokens per minute are used up; else None."""
    if ring is None or key is None:
        return None
    try:
        ring.authorize(key, tier)
        ring.check_tokens(key, time.monotonic())
    except AuthError as exc:
        return refusal(exc)
    return None


def limits_of(key: KeyEntry | None) -> dict | None:
    """The key's own rate limits, for depth control to hold across every router (None: none)."""
    if key is None or (key.requests_per_minute is None and key.tokens_per_minute is None):
        return None
    return {"requests_per_minute": key.requests_per_minute, "tokens_per_minute": key.tokens_per_minute}


def cluster_refusal(refused: dict) -> JSONResponse:
    """Depth control's refusal of a key over its limits (budgets.KeyRefusal), as this replica's own."""
    return refusal(
        AuthError(
            429,
            "rate_limit_exceeded",
            str(refused["message"]),
            type_=str(refused["kind"]),
            retry_after=int(refused["retry_after_s"]),
        )
    )


def record_tokens(ring: KeyRing | None, name: str, completion_tokens: int) -> None:
    key = ring.by_name.get(name) if ring is not None else None
    if key is not None:
        ring.record_tokens(key, completion_tokens, time.monotonic())
