"""The router's guards against hostile input without Ray: the body/header limits (pure ASGI), the
catch-all error handler, text that is not Unicode, and state errors raised through Ray. The same
inputs run against the served cluster in tests/e2e/test_hostile_input.py."""

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from services.control.client import _user_message
from services.control.state import UnknownRequestError
from services.ingress.api import BodyLimit, ChatRequest, error_response, install_error_handlers

LIMIT = 2048


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.state.max_body_bytes = LIMIT
    app.state.max_header_bytes = 1024

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return {"messages": len(req.messages), "stop": req.stop}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    return app


@pytest.fixture
def client():
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def ok_body(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def assert_openai_error(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_declared_length_over_the_limit_is_refused_before_reading(client):
    resp = client.post("/v1/chat/completions", content=b" " * (LIMIT + 1))
    assert "larger than 2048" in assert_openai_error(resp, 413)["message"]


def test_chunked_body_is_cut_off_at_the_limit_and_a_small_one_passes_intact(client):
    def chunks(total: int):
        for _ in range(total // 512):
            yield b" " * 512

    assert_openai_error(client.post("/v1/chat/completions", content=chunks(LIMIT * 4)), 413)
    body = json.dumps(ok_body(stop="END")).encode()
    json_type = {"content-type": "application/json"}
    resp = client.post("/v1/chat/completions", content=iter([body[:10], body[10:]]), headers=json_type)
    assert resp.status_code == 200 and resp.json() == {"messages": 1, "stop": "END"}


def test_header_block_over_the_limit_is_refused(client):
    resp = client.post("/v1/chat/completions", json=ok_body(), headers={"x-session-id": "a" * 2000})
    assert_openai_error(resp, 431)


def _asgi(app, headers: list[tuple[bytes, bytes]], messages: list[dict]) -> list[dict]:
    """Drive the ASGI app directly: for what a client library will not send."""
    sent: list[dict] = []
    incoming = list(messages)

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("length", [b"-1", b"12a", b"\xb2", b"9" * 30, b"3000"])
def test_malformed_content_length_is_a_413_not_a_crash(length):
    sent = _asgi(make_app(), [(b"content-length", length)], [{"type": "http.request", "body": b"{}"}])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["type"] == "invalid_request_error"


def test_client_leaving_mid_body_gets_no_answer_and_no_error():
    partial = {"type": "http.request", "body": b"{", "more_body": True}
    assert _asgi(make_app(), [], [partial, {"type": "http.disconnect"}]) == []


def test_an_unexpected_fault_is_an_openai_shaped_500(client):
    err = assert_openai_error(client.get("/boom"), 500)
    assert err["type"] == "server_error" and "a bug" not in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (ok_body(stop=""), "stop"),  # the engine refuses it: was a 500 from inside a round
        (ok_body(stop=["a", ""]), "stop"),
        (ok_body(messages=[{"role": "user", "content": "\ud800"}]), "messages.0.content"),
        (
            ok_body(messages=[{"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}]),
            "messages.0.content.0.text",
        ),
        (ok_body(model="m\ud800"), "model"),
        (ok_body(stop=["\udc00"]), "stop.0"),
    ],
)
def test_empty_stop_and_lone_surrogates_are_400s(client, body, param):
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogates travel as \\ud800 escapes
    resp = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(resp, 400, param)


def test_an_error_quoting_a_lone_surrogate_still_renders():
    resp = error_response(404, "no model 'm\ud800'", param="model\udc00")
    assert json.loads(resp.body)["error"]["message"] == "no model 'm?'"


def test_state_errors_raised_in_the_actor_show_their_message_not_the_remote_traceback():
    cause = UnknownRequestError("no finished request 'chatcmpl-nope'")
    remote = RayTaskError("DepthControl.feedback", "Traceback ...\n  pid=123, ip=10.0.0.1", cause)
    exc = remote.as_instanceof_cause()
    assert isinstance(exc, UnknownRequestError)
    assert _user_message(exc) == "no finished request 'chatcmpl-nope'"
    assert _user_message(cause) == "no finished request 'chatcmpl-nope'"
