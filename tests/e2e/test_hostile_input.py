"""Hostile input against the served router (issue 7, item 2): requests generated from the router's own
/openapi.json by schemathesis, then hand-written ones no schema describes: huge and lying bodies,
deeply nested JSON, bytes that are not UTF-8, control fields at their extremes, thousands of messages,
header injection, wrong content types. Zero 5xx; every refusal is OpenAI-shaped JSON; a normal request
is answered afterwards.

Loopback only, bounded (few generated examples per operation, max_tokens <= 4, the low tier) and
derandomized (Hypothesis' fixed seed), so a run tries the same cases every time. Counts per input
class are printed at the end (`-s`) and, with PONDER_HOSTILE_SUMMARY=PATH, written as JSON:
docs/reliability.md quotes them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 200  # per operation and mode (positive, negative); fewer when the space is smaller
ENGINE_EXAMPLES = 15  # valid chat requests: most of them run rounds on the engine (~1-2 s each on CPU)
SCENARIOS = 25  # stateful: sequences that follow the OpenAPI links from chat completions ...
SCENARIO_STEPS = 6  # ... of at most this many calls each
TINY = 4  # max_tokens of any request that reaches the engine
ERROR_KEYS = {"message", "type", "param", "code"}
GENERATED = "generated from /openapi.json"
PROTOCOL = "malformed HTTP (refused by the HTTP server, never reaches the API)"

# input class -> Counter(tried, survived) and the names of the cases that did not survive
TALLY: dict[str, Counter] = defaultdict(Counter)
LOST: dict[str, list[str]] = defaultdict(list)
STATUSES: dict[str, Counter] = defaultdict(Counter)  # input class -> HTTP status -> responses
SECONDS: dict[str, float] = defaultdict(float)  # input class -> response time, all its cases


def openai_error(status: int, content_type: str, body: bytes) -> str | None:
    """Why a refusal is not OpenAI's error shape, or None when it is."""
    if not content_type.startswith("application/json"):
        return f"{status} with content-type {content_type!r}"
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} body is not {{'error': ...}}: {body[:200]!r}"
    if not isinstance(err, dict) or set(err) != ERROR_KEYS:
        return f"{status} error keys {sorted(err) if isinstance(err, dict) else err!r}"
    if not (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)):
        return f"{status} error message/type missing: {err!r}"
    return None


def tally(cls: str, name: str, status: int, content_type: str, body: bytes, seconds: float) -> str | None:
    """Count one response; return why it did not survive (a 5xx, or a refusal not OpenAI-shaped)."""
    TALLY[cls]["tried"] += 1
    SECONDS[cls] += seconds
    STATUSES[cls][status] += 1
    problem = f"{status} server error" if status >= 500 else None
    if problem is None and status >= 300:
        problem = openai_error(status, content_type, body)
    if problem is None:
        TALLY[cls]["survived"] += 1
    else:
        LOST[cls].append(f"{name}: {problem}")
    return problem


# --- generated from the OpenAPI description ----------------------------------------------------

# Every route the router serves; the test below checks /openapi.json lists exactly these, so a new
# route is fuzzed too (or this list is told about it).
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/feedback"),
    ("GET", "/v1/domains"),
    ("GET", "/v1/reviews"),
    ("GET", "/v1/reviews/{review_id}"),
    ("POST", "/v1/reviews/{review_id}/approve"),
    ("POST", "/v1/reviews/{review_id}/reject"),
    ("GET", "/v1/models"),
    ("GET", "/healthz"),
]
# Operations whose input can break the schema at all (a path string or no input at all cannot).
NEGATABLE = {OPERATIONS[i] for i in (0, 1, 3, 5, 6)}
GENERATED_CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or (method, path) in NEGATABLE
]


@pytest.fixture(scope="module")
def api_schema(base_url):
    config = SchemathesisConfig.from_dict(
        {
            "base-url": base_url,
            "request-timeout": 60,
            # refusals of oversized input are right answers to negative data too
            "checks": {"negative_data_rejection": {"expected-statuses": [400, 404, 405, 409, 413, 431]}},
        }
    )
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)


def test_openapi_describes_every_route_its_request_bodies_and_its_errors(api_schema):
    spec = api_schema.raw_schema
    served = {(m.upper(), path) for path, item in spec["paths"].items() for m in item}
    assert served == set(OPERATIONS)
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)  # validation errors are 400s here
            for status in ("4XX", "5XX"):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, status)
    chat_body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert chat_body["required"] and chat_body["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatRequest"
    )


def _cap(obj: object, field: str, most: int, valid_up_to: int | None = None) -> None:
    """Lower a field the schema accepts (an int from 1 to `valid_up_to`) to at most `most`; a value
    the schema forbids stays as generated, so negative data stays negative."""
    value = obj.get(field) if isinstance(obj, dict) else None
    if type(value) is int and 1 <= value <= (valid_up_to or value):
        obj[field] = min(value, most)


def _shorten(messages: object, most: int = 64) -> None:
    """Cut the text of each message (and of each text part) to `most` characters."""
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            m["content"] = content[:most]
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] = part["text"][:most]


def bounded(case, model: str, critical: bool = False) -> None:
    """Keep generated chat requests cheap when they reach the engine, and let them get that far:
    the served model's name (a random one is a 404 before any real work), the low tier (two rounds at
    most), max_tokens <= TINY, message texts of at most 64 characters, at most 4 ToT nodes. Only values
    the schema accepts are changed: what it forbids stays, to be refused. (Long texts: hand-written.)"""
    body = case.body
    if case.path != "/v1/chat/completions" or not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and 1 <= len(body["model"]) <= 256:
        body["model"] = model
    _cap(body, "max_tokens", TINY)
    _cap(body, "max_completion_tokens", TINY)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = TINY
    _shorten(body.get("messages"))
    reasoning = body.setdefault("reasoning", {"tier": "low"})
    if isinstance(reasoning, dict) and reasoning.get("tier", "low") in ("low", "medium", "high", "critical"):
        # critical (held for review: 202, one round) only where the review links are followed
        held = critical
        reasoning["tier"] = "critical" if held else "low"
        if held:
            reasoning["max_rounds"] = 1
        _cap(reasoning.get("tot"), "max_total_nodes", 4, valid_up_to=64)


def openai_shaped(ctx, response, case) -> None:
    """Custom check: every non-2xx response is OpenAI's error shape."""
    if response.status_code >= 300:
        content_type = (response.headers.get("content-type") or [""])[0]
        problem = openai_error(response.status_code, content_type, response.content)
        assert problem is None, problem


CHECKS = [not_a_server_error, response_schema_conformance, negative_data_rejection, openai_shaped]


@pytest.mark.parametrize(("method", "path", "mode"), GENERATED_CASES)
def test_generated_requests_get_no_5xx_and_openai_shaped_refusals(api_schema, app_config, method, path, mode):
    """Schemathesis' cases for one operation: valid (positive) or violating the schema (negative).
    Hypothesis drives schemathesis' strategy directly: schemathesis 4.32.5's pytest loader
    (`schemathesis.pytest.from_fixture`) sets `Function._nodeid`, which pytest 9.2 no longer has."""
    operation = api_schema[path][method]
    model, cls = app_config.engine.model, f"{GENERATED}: {method} {path}"
    reaches_engine = path == "/v1/chat/completions" and mode is GenerationMode.POSITIVE

    @settings(
        max_examples=ENGINE_EXAMPLES if reaches_engine else MAX_EXAMPLES,
        derandomize=True,  # the same cases every run
        database=None,
        deadline=None,  # real HTTP to a real engine
        phases=[Phase.explicit, Phase.generate],  # no shrinking against a live server: bounded time
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=operation.as_strategy(mode))
    def run(case) -> None:
        bounded(case, model)
        response = case.call()
        content_type = (response.headers.get("content-type") or [""])[0]
        name = f"{mode.value} {case.body!r:.200}"
        tally(cls, name, response.status_code, content_type, response.content, response.elapsed)
        case.validate_response(response, checks=CHECKS)

    run()


STATEFUL = f"{GENERATED}, stateful (links: chat -> feedback; chat -> review -> approve, reject)"
STATEFUL_CHECKS = [not_a_server_error, response_schema_conformance, openai_shaped]
FOLLOWED: Counter = Counter()  # link-driven calls that found what the previous response named
LINKED = {
    "/v1/feedback",
    "/v1/reviews/{review_id}",
    "/v1/reviews/{review_id}/approve",
    "/v1/reviews/{review_id}/reject",
}


def test_stateful_sequences_follow_the_links_and_get_no_5xx(api_schema, app_config):
    """Schemathesis' state machine from /openapi.json's links: a chat completion, then feedback on
    its id, or (critical tier) its review read, approved or rejected; any order, repeats included."""
    model = app_config.engine.model

    class Sequences(api_schema.as_state_machine()):
        def setup(self) -> None:
            self.chats = 0  # per scenario, so that Hypothesis replays one the same way

        def before_call(self, case) -> None:
            if case.path == "/v1/chat/completions":
                self.chats += 1  # every other chat is held for review: both kinds of link
            bounded(case, model, critical=self.chats % 2 == 0)

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            content_type = (response.headers.get("content-type") or [""])[0]
            name = f"{case.method} {case.path} {case.body!r:.200}"
            tally(STATEFUL, name, response.status_code, content_type, response.content, response.elapsed)
            if case.path in LINKED and response.status_code in (200, 409):
                FOLLOWED[f"{case.method} {case.path}"] += 1  # the id from the chat was real
            case.validate_response(response, checks=STATEFUL_CHECKS)

    Sequences.run(
        settings=settings(
            max_examples=SCENARIOS,
            stateful_step_count=SCENARIO_STEPS,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )
    )
    # the links were really followed: feedback on real completions and decisions on real reviews
    assert FOLLOWED["POST /v1/feedback"] > 0, FOLLOWED
    reviewed = sum(v for k, v in FOLLOWED.items() if k.startswith(("GET /v1/reviews/", "POST /v1/reviews/")))
    assert reviewed > 0, FOLLOWED


# --- hand-written -------------------------------------------------------------------------------

J = {"content-type": "application/json"}
CHAT = "/v1/chat/completions"
MIB = 1 << 20


def chat(model: str, **extra) -> dict:
    base = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "reasoning": {"tier": "low", "max_rounds": 1},
    }
    return base | extra


def reasoning(model: str, **fields) -> dict:
    return chat(model, reasoning={"tier": "low", **fields})


def raw_chat(model: str, field: str, literal: str) -> bytes:
    """A chat request whose `field` is the JSON literal given (NaN, 1e999, ... that json.dumps refuses)."""
    body = json.dumps(chat(model))
    return (body[:-1] + f', "{field}": {literal}}}').encode()


def with_content(model: str, content: bytes) -> bytes:
    """A chat request whose one message's content is the raw bytes given (inside the quotes)."""
    return json.dumps(chat(model)).encode().replace(b'"hi"', b'"' + content + b'"')


def spaces(total: int, chunk: int = 64 << 10):
    for start in range(0, total, chunk):
        yield b" " * min(chunk, total - start)


def big_json(model: str, pad: int):
    """A valid chat request of `pad` bytes and more, sent chunked (no Content-Length)."""
    head = json.dumps(chat(model))[:-1].encode() + b', "pad": "'
    yield head
    yield from (b"a" * (64 << 10) for _ in range(pad // (64 << 10)))
    yield b'"}'


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (input class, name, how to send, the statuses that are right)
# how to send: ("json", body) | ("bytes", body, headers) | ("chunks", factory, headers)
#            | ("headers", body, extra headers) | ("get", path, params) | ("post", path, body)
def hand_written(m: str) -> list[tuple]:
    huge, nest, utf8 = "huge bodies", "deeply nested JSON", "invalid UTF-8 / not Unicode"
    ctl, many, hdr = "control fields at their extremes", "thousands of messages", "huge headers"
    ctype, other = "wrong content type / not a JSON object", "control endpoints, bad ids"
    msg = [{"role": "user", "content": "a"}]
    return [
        (huge, "2 MiB declared", ("bytes", b"x" * (2 * MIB), J), {413}),
        (huge, "64 MiB chunked, no length", ("chunks", lambda: spaces(64 * MIB), J), {413}),
        (huge, "2 MiB valid JSON chunked", ("chunks", lambda: big_json(m, 2 * MIB), J), {413}),
        (huge, "900 KiB valid JSON chunked", ("chunks", lambda: big_json(m, 900 << 10), J), {200}),
        (
            huge,
            "one 100k-char message",
            ("json", chat(m, messages=[{"role": "user", "content": "x" * 10**5}])),
            {400},
        ),
        (nest, "100k nested arrays", ("bytes", nested(100_000), J), {400}),
        (
            nest,
            "100k nested arrays as messages",
            ("bytes", b'{"model":"m","messages":' + nested(10**5) + b"}", J),
            {400},
        ),
        (nest, "50k nested objects", ("bytes", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, J), {400}),
        (nest, "500k unclosed arrays", ("bytes", b"[" * 500_000, J), {400}),
        (
            nest,
            "5000 nested in reasoning",
            ("bytes", raw_chat(m, "reasoning", '{"tot":' * 5000 + "1" + "}" * 5000), J),
            {400},
        ),
        (utf8, "0xff 0xfe in model", ("bytes", b'{"model": "\xff\xfe", "messages": []}', J), {400}),
        (utf8, "overlong encoding in content", ("bytes", with_content(m, b"\xc0\xaf"), J), {400}),
        (utf8, "lone surrogate in content", ("bytes", with_content(m, b"\\ud800"), J), {400}),
        (utf8, "lone surrogate in model", ("bytes", json.dumps(chat(m + "\udfff")).encode(), J), {400}),
        (utf8, "lone surrogate in stop", ("bytes", json.dumps(chat(m, stop=["\ud800"])).encode(), J), {400}),
        (utf8, "NUL in content", ("json", chat(m, messages=[{"role": "user", "content": "a\x00b"}])), {200}),
        (utf8, "UTF-16 body", ("bytes", json.dumps(chat(m)).encode("utf-16"), J), {200}),
        *[
            (ctl, f"max_tokens {v}", ("json", chat(m, max_tokens=v)), {400})
            for v in (0, -1, 2**63, 2**64, 1.5)
        ],
        (ctl, 'max_tokens "4" (pydantic\'s lax mode takes it)', ("json", chat(m, max_tokens="4")), {200}),
        (ctl, "max_completion_tokens 2**63", ("json", chat(m, max_completion_tokens=2**63)), {400}),
        *[
            (ctl, f"temperature {v}", ("bytes", raw_chat(m, "temperature", v), J), {400})
            for v in ("NaN", "Infinity", "-Infinity", "1e999", "2.0000001", '"hot"')
        ],
        (ctl, "temperature -0", ("bytes", raw_chat(m, "temperature", "-0"), J), {200}),
        *[
            (ctl, f"top_p {v}", ("bytes", raw_chat(m, "top_p", v), J), {400})
            for v in ("0", "-0", "NaN", "Infinity", "1.0000001")
        ],
        (ctl, "top_p 1e-320", ("bytes", raw_chat(m, "top_p", "1e-320"), J), {200}),
        *[(ctl, f"seed {v}", ("json", chat(m, seed=v)), {400}) for v in (2**63, -1, 2**200)],
        (ctl, "seed 2**63-1", ("json", chat(m, seed=2**63 - 1)), {200}),
        *[(ctl, f"n {v}", ("json", chat(m, n=v)), {400}) for v in (0, 2, -1, 2**63)],
        (ctl, "stop with 5000 entries", ("json", chat(m, stop=["x"] * 5000)), {400}),
        (ctl, "stop empty string", ("json", chat(m, stop="")), {400}),
        (ctl, 'stop [""]', ("json", chat(m, stop=[""])), {400}),
        (ctl, "stop 100k chars", ("json", chat(m, stop="x" * 10**5)), {200}),
        (ctl, "stop 4 entries", ("json", chat(m, stop=["a", "b", "c", "d"])), {200}),
        *[
            (ctl, f"reasoning {json.dumps(r)}", ("json", reasoning(m, **r)), {400})
            for r in (
                {"max_rounds": 0},
                {"max_rounds": 3},
                {"max_rounds": 17},
                {"min_rounds": 0},
                {"min_rounds": 2**70},
                {"max_rounds": 1, "min_rounds": 2},
                {"confidence_threshold": 1.0000001},
                {"confidence_threshold": -1e-9},
                {"tot": {"branching": 0}},
                {"tot": {"branching": 4}},
                {"tot": {"max_total_nodes": 65}},
                {"tot": {"max_depth": 17}},
                {"domain": ""},
                {"domain": "x" * 65},
                {"domain": "astrology"},
                {"strategy": "mcts"},
                {"tier": "extreme"},
                {"depth": 3},
            )
        ],
        (
            ctl,
            "reasoning threshold NaN",
            ("bytes", raw_chat(m, "reasoning", '{"confidence_threshold": NaN}'), J),
            {400},
        ),
        (
            ctl,
            "reasoning at bounds",
            ("json", reasoning(m, max_rounds=2, min_rounds=2, confidence_threshold=0.0)),
            {200},
        ),
        (
            ctl,
            "tot at the low tier",
            ("json", reasoning(m, strategy="tot", tot={"branching": 2, "max_total_nodes": 3})),
            {200},
        ),
        (many, "513 messages", ("json", chat(m, messages=msg * 513)), {400}),
        (many, "5000 messages", ("json", chat(m, messages=msg * 5000)), {400}),
        (many, "20000 bare messages", ("json", chat(m, messages=[{"role": "user"}] * 20000)), {400}),
        (many, "100000 messages (past the body limit)", ("json", chat(m, messages=msg * 100_000)), {413}),
        (many, "512 messages (past the context)", ("json", chat(m, messages=msg * 512)), {400}),
        (hdr, "40 KiB x-session-id", ("headers", chat(m), {"x-session-id": "s" * (40 << 10)}), {431}),
        (
            hdr,
            "60 KiB x-request-id (echoed)",
            ("headers", chat(m), {"x-request-id": "r" * (60 << 10)}),
            {431},
        ),
        (hdr, "8 MiB header", ("headers", chat(m), {"x-pad": "p" * (8 * MIB)}), {431}),
        (hdr, "1000 small headers", ("headers", chat(m), {f"x-h{i}": "v" for i in range(1000)}), {200}),
        (
            hdr,
            "x-request-id with markup",
            ("headers", chat(m), {"x-request-id": "<script>alert(1)</script>"}),
            {200},
        ),
        *[
            (
                ctype,
                f"{t or 'no'} content type",
                ("bytes", json.dumps(chat(m)).encode(), {"content-type": t}),
                {400},
            )
            for t in ("text/plain", "application/xml", "application/x-www-form-urlencoded", "")
        ],
        (
            ctype,
            "multipart form",
            (
                "bytes",
                b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--b--\r\n',
                {"content-type": "multipart/form-data; boundary=b"},
            ),
            {400},
        ),
        (ctype, "empty body", ("bytes", b"", J), {400}),
        (ctype, "whitespace body", ("bytes", b" \r\n\t ", J), {400}),
        *[
            (ctype, f"JSON {v.decode()}", ("bytes", v, J), {400})
            for v in (b"null", b"1", b'"s"', b"true", b"[]", b"{}", b"[1, 2, 3]")
        ],
        (
            other,
            "feedback for an unknown id",
            ("post", "/v1/feedback", {"request_id": "chatcmpl-nope", "correct": True}),
            {404},
        ),
        (
            other,
            "feedback with a surrogate id",
            ("post", "/v1/feedback", json.dumps({"request_id": "\ud800", "correct": True}).encode()),
            {400},
        ),
        (
            other,
            "approve an unknown review",
            ("post", "/v1/reviews/review-nope/approve", {"reviewer": "x"}),
            {404},
        ),
        (other, "approve with a broken body", ("post", "/v1/reviews/review-nope/approve", b"["), {400}),
        (other, "10k-char review id", ("get", "/v1/reviews/" + "x" * 10_000, None), {404}),
        (other, "review id with NUL and 0xff", ("get", "/v1/reviews/%00%ff", None), {404}),
        (other, "reviews limit 10**23", ("get", "/v1/reviews", {"limit": "9" * 23}), {400}),
        (other, "reviews limit abc", ("get", "/v1/reviews", {"limit": "abc"}), {400}),
        (other, "unknown path", ("get", "/v1/engines", None), {404}),
        (other, "wrong method", ("post", "/v1/models", {}), {405}),
    ]


def send(http: httpx.Client, how: tuple) -> httpx.Response:
    kind = how[0]
    if kind == "json":
        return http.post(CHAT, json=how[1])
    if kind == "bytes":
        return http.post(CHAT, content=how[1], headers=how[2])
    if kind == "chunks":
        return http.post(CHAT, content=how[1](), headers=how[2])
    if kind == "headers":
        return http.post(CHAT, json=how[1], headers=how[2])
    if kind == "get":
        return http.get(how[1], params=how[2])
    body = how[2]
    return (
        http.post(how[1], content=body, headers=J)
        if isinstance(body, bytes)
        else http.post(how[1], json=body)
    )


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def cases(app_config):
    return hand_written(app_config.engine.model)


CASE_NAMES = [c[1] for c in hand_written("m")]


@pytest.mark.parametrize("i", range(len(CASE_NAMES)), ids=CASE_NAMES)
def test_hand_written_hostile_input(http, cases, i):
    cls, name, how, statuses = cases[i]
    try:
        resp = send(http, how)
    except httpx.HTTPError as exc:  # e.g. the server answered 413 and closed while we still sent
        TALLY[cls]["tried"] += 1
        LOST[cls].append(f"{name}: {type(exc).__name__}")
        raise
    content_type, seconds = resp.headers.get("content-type", ""), resp.elapsed.total_seconds()
    problem = tally(cls, name, resp.status_code, content_type, resp.content, seconds)
    assert problem is None, (name, problem)
    assert resp.status_code in statuses, (name, resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        message = resp.json()["error"]["message"]
        assert "ray::" not in message and "Traceback" not in message, (name, message)  # no internals


# --- below HTTP: bytes that are not a valid request ---------------------------------------------


def raw_exchange(base_url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh connection; return what comes back until the server closes or stalls."""
    u = urlsplit(base_url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def request_bytes(head: bytes, body: bytes = b"{}") -> bytes:
    """A chat POST with the header lines given (each ending in CRLF), then the body."""
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n" + body


PROTOCOL_CASES = [
    ("bare LF in x-session-id", request_bytes(b"x-session-id: a\nx-injected: 1\r\nContent-Length: 2\r\n")),
    ("bare CR in x-session-id", request_bytes(b"x-session-id: a\rx-injected: 1\r\nContent-Length: 2\r\n")),
    ("control bytes in x-request-id", request_bytes(b"x-request-id: a\x01\x7f\r\nContent-Length: 2\r\n")),
    ("Content-Length shorter than the body", request_bytes(b"Content-Length: 1\r\n", b'{ "model": 1 }')),
    ("negative Content-Length", request_bytes(b"Content-Length: -1\r\n")),
    ("5000-digit Content-Length", request_bytes(b"Content-Length: " + b"9" * 5000 + b"\r\n")),
    ("two Content-Lengths", request_bytes(b"Content-Length: 2\r\nContent-Length: 3\r\n")),
    (
        "Content-Length and chunked",
        request_bytes(b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
    ),
]


@pytest.mark.parametrize(("name", "data"), PROTOCOL_CASES, ids=[c[0] for c in PROTOCOL_CASES])
def test_malformed_http_is_refused_without_a_5xx_and_nothing_is_injected(base_url, name, data):
    out = raw_exchange(base_url, data)
    status_line, _, rest = out.partition(b"\r\n")
    head_bytes = rest.partition(b"\r\n\r\n")[0].lower()
    TALLY[PROTOCOL]["tried"] += 1
    STATUSES[PROTOCOL][status_line[9:12].decode("latin-1")] += 1
    ok = status_line.startswith(b"HTTP/1.1 4") and b"x-injected" not in head_bytes
    TALLY[PROTOCOL]["survived" if ok else "lost"] += 1
    if not ok:
        LOST[PROTOCOL].append(f"{name}: {out[:200]!r}")
    assert ok, (name, out[:300])


def test_a_stalled_body_holds_nothing_back(base_url, http, app_config):
    """A client that declares more body than it sends, then leaves: the server waits, then serves on."""
    u = urlsplit(base_url)
    with socket.create_connection((u.hostname, u.port), timeout=2) as s:
        s.sendall(request_bytes(b"Content-Type: application/json\r\nContent-Length: 1000\r\n", b'{"model"'))
        with pytest.raises(TimeoutError):
            s.recv(1)
    resp = http.post(CHAT, json=chat(app_config.engine.model))
    assert resp.status_code == 200, resp.text


def test_the_server_still_answers_a_normal_request(http, app_config):
    for _ in range(3):
        resp = http.post(CHAT, json=chat(app_config.engine.model, max_tokens=4))
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] is not None
    assert http.get("/healthz").json()["status"] == "ok"


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Print (and with PONDER_HOSTILE_SUMMARY, write) the counts once the module is done."""
    started = time.monotonic()
    yield
    rows = {
        cls: {
            "tried": c["tried"],
            "survived": c["survived"],
            "lost": LOST.get(cls, []),
            "statuses": {str(k): v for k, v in sorted(STATUSES[cls].items())},
            "seconds": round(SECONDS[cls], 1),
        }
        for cls, c in sorted(TALLY.items())
    }
    result = {
        "command": "PONDER_HOSTILE_SUMMARY=bench/results/hostile_input.json "
        ".venv/bin/pytest tests/e2e/test_hostile_input.py -q -s",
        "max_examples": MAX_EXAMPLES,
        "engine_examples": ENGINE_EXAMPLES,
        "stateful": {"scenarios": SCENARIOS, "steps": SCENARIO_STEPS, "links_followed": dict(FOLLOWED)},
        "seconds_with_cluster_start": round(time.monotonic() - started, 1),
        "classes": rows,
    }
    print("\nhostile input: class | tried | survived | lost")
    for cls, row in rows.items():
        lost = f"{len(row['lost'])} {row['lost'][:3]}"
        print(f"  {cls} | {row['tried']} | {row['survived']} | {lost} | statuses {row['statuses']}")
    if path := os.environ.get("PONDER_HOSTILE_SUMMARY"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
