"""OpenAI-compatible request/response shapes and OpenAI-shaped errors (pure: pydantic + FastAPI).

Requests accept and ignore unknown top-level fields, as OpenAI clients send many optional ones;
the fields Ponder acts on are validated strictly, and the `reasoning` object forbids unknown keys.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.reasoning.prompts import Message
from services.reasoning.tiers import ABSOLUTE_MAX_ROUNDS, TIER_NAMES

Role = Literal["system", "developer", "user", "assistant", "tool"]


def _unicode(v: str) -> str:
    # JSON's \ud800-style escapes decode to lone surrogates: not text, no tokenizer or UTF-8 encoder
    # takes them, so they are refused here rather than failing deep inside a request.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate escape)") from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Role
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class TotOptions(BaseModel):
    """Per-request Tree-of-Thought budgets: they may narrow the tier's, never widen them."""

    model_config = ConfigDict(extra="forbid")
    branching: int | None = Field(None, ge=1, le=3, description="Children per expansion (one request).")
    max_depth: int | None = Field(None, ge=1, le=ABSOLUTE_MAX_ROUNDS, description="Rounds on a path.")
    max_total_nodes: int | None = Field(None, ge=1, le=64, description="Nodes generated in all.")


class ReasoningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: Literal["low", "medium", "high", "critical"] | None = Field(
        None, description=f"Complexity tier, one of {TIER_NAMES}; default: the configured tier."
    )
    max_rounds: int | None = Field(None, ge=1, le=ABSOLUTE_MAX_ROUNDS)
    min_rounds: int | None = Field(None, ge=1, le=ABSOLUTE_MAX_ROUNDS)
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    domain: Text | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Threshold domain (GET /v1/domains); default: detected.",
    )
    strategy: Literal["cot", "tot"] | None = Field(
        None, description="cot: one chain of rounds; tot: Tree-of-Thought; default: the tier's."
    )
    tot: TotOptions | None = None
    mode: Literal["thinking", "rounds"] | None = Field(
        None,
        description="For a model that thinks natively: thinking (default; one trace in segments, "
        "closed for the answer) or rounds (draft, verify, ...; each round's trace parsed out).",
    )
    kv_store: bool | None = Field(
        None,
        description="Keep this request's KV in the cluster's KV store across rounds and workers "
        "(default: on when the server has a store); false: nothing of it is stored.",
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: Text = Field(min_length=1, max_length=128, description="The chat completion's id.")
    correct: bool


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reviewer: Text | None = Field(None, max_length=256)
    note: Text | None = Field(None, max_length=4096)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text = Field(min_length=1, max_length=256)
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="Per-round completion token cap.")
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        description="Thinking mode: OpenAI's meaning, the trace (and probes) plus the answer; the trace "
        "is closed early enough to leave the answer router.answer_reserve_tokens. Rounds mode: as "
        "max_tokens.",
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    user: Text | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="vLLM extension: generate max_tokens every round.")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None,
        description="OpenAI's reasoning effort: the tier of that name (reasoning.tier, if set too, must "
        "agree). Absent: reasoning.tier, else the tier scored from the prompt.",
    )
    thinking_token_budget: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="vLLM's name: the most thinking tokens (thinking mode), within the tier's.",
    )
    reasoning: ReasoningOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        # The engine refuses an empty stop string: refused here as a 400, not a failed round.
        if v == "" or (isinstance(v, list) and (len(v) > 4 or any(not s for s in v))):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    def conversation(self) -> list[Message]:
        return [Message(m.role, m.text()) for m in self.messages]

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: the body of every refusal (4xx) and fault (5xx) of this API."""

    error: ErrorBody


# For the OpenAPI description (FastAPI(responses=...)): every route's errors, instead of FastAPI's
# default 422 HTTPValidationError, which this API never sends (validation errors are 400s).
ERROR_RESPONSES: dict[int | str, dict] = {
    "4XX": {"model": ErrorResponse, "description": "Refused; OpenAI's error shape."},
    "5XX": {"model": ErrorResponse, "description": "Server fault or unavailable; OpenAI's error shape."},
}


# OpenAPI links (what a client does next with a chat completion's id): feedback on an answer; read,
# approve or reject one held for review. Schemathesis' stateful run follows them
# (tests/e2e/test_hostile_input.py); FastAPI merges this into the chat operation.
_REVIEW_ID = {"review_id": "$response.body#/id"}
CHAT_LINKS: dict = {
    "responses": {
        "200": {
            "links": {
                "Feedback": {
                    "operationId": "feedback_v1_feedback_post",
                    "requestBody": {"request_id": "$response.body#/id", "correct": True},
                    "description": "Whether this completion's answer was correct.",
                }
            }
        },
        "202": {
            "description": "Held for human review (the critical tier): the review, its proposed answer.",
            "content": {"application/json": {"schema": {"type": "object"}}},
            "links": {
                "GetReview": {
                    "operationId": "get_review_v1_reviews__review_id__get",
                    "parameters": _REVIEW_ID,
                },
                "Approve": {
                    "operationId": "approve_v1_reviews__review_id__approve_post",
                    "parameters": _REVIEW_ID,
                },
                "Reject": {
                    "operationId": "reject_v1_reviews__review_id__reject_post",
                    "parameters": _REVIEW_ID,
                },
            },
        },
    }
}


class ApiError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    # A message may quote the request: whatever it holds must not break the error itself.
    message = message.encode("utf-8", "replace").decode("utf-8")
    param = None if param is None else param.encode("utf-8", "replace").decode("utf-8")
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


# Names pydantic gives the members of a union in an error's location ("str", "list[TextPart]",
# "function-after[...]"): not part of the request, so not of `param`.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_field(part: object) -> bool:
    return isinstance(part, int) or (str(part).isidentifier() and part not in _TYPE_TAGS)


def _describe(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and _is_field(p)]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return "The request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "")), None
    if err.get("type") == "missing" and not loc:
        return "The request body is missing; send a JSON object.", None
    where = f"'{param}'" if param else "the request body"
    return f"Invalid value for {where}: {err.get('msg', 'invalid')}", param


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal is OpenAI-shaped JSON with a 4xx status; unexpected faults are a clean 500."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The deepest error first: of a union's members, the one the value came closest to matching.
        errors = sorted(exc.errors(), key=lambda e: -len(e.get("loc", ())))
        message, param = _describe(errors[0]) if errors else ("Invalid request.", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(400, message, param=param)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not a refusal: still OpenAI-shaped JSON, never a plain-text page. Starlette
        # re-raises the exception after this response, so the replica's log keeps its traceback.
        return error_response(500, "The server had an error processing your request.", "server_error")


class BodyLimit:
    """ASGI middleware: refuses a header block over `app.state.max_header_bytes` (431) and a body over
    `app.state.max_body_bytes` (413), before the app reads either.

    A declared Content-Length is checked up front (the HTTP server then holds the client to it); a body
    without one (chunked) is read up to the limit and handed on from memory, so no body larger than the
    limit is ever held, whatever its framing.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        body_limit = getattr(state, "max_body_bytes", 1 << 20)
        header_limit = getattr(state, "max_header_bytes", 32 << 10)
        headers = scope["headers"]
        too_large = ApiError(413, f"Request body larger than {body_limit} bytes.")
        if sum(len(k) + len(v) + 4 for k, v in headers) > header_limit:
            await ApiError(431, f"Request headers larger than {header_limit} bytes.").response()(
                scope, receive, send
            )
            return
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None:
            ok = length.isdigit() and len(length) <= 20 and int(length) <= body_limit
            await (self.app if ok else too_large.response())(scope, receive, send)
            return
        chunks: list[bytes] = []
        status = await _read_body(receive, body_limit, chunks)
        if status == "too_large":
            await too_large.response()(scope, receive, send)
        elif status == "complete":
            await self.app(scope, _replay(b"".join(chunks), receive), send)
        # "disconnected": the client left mid-body; nobody to answer


async def _read_body(receive: Receive, limit: int, chunks: list[bytes]) -> str:
    """Read the request body into `chunks` until it ends ("complete"), grows past `limit` bytes
    ("too_large") or the client leaves ("disconnected")."""
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return "disconnected"
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return "too_large"
        chunks.append(chunk)
        if not message.get("more_body", False):
            return "complete"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the already-read body on once, then the client's later messages
    (e.g. http.disconnect, which streaming responses listen for)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
