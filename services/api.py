"""OpenAI-compatible request/response shapes and OpenAI-shaped errors (pure: pydantic + FastAPI).

Requests accept and ignore unknown top-level fields, as OpenAI clients send many optional ones;
the fields Ponder acts on are validated strictly, and the `reasoning` object forbids unknown keys.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.reasoning.prompts import Message
from services.reasoning.tiers import ABSOLUTE_MAX_ROUNDS, TIER_NAMES

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

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
    domain: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Threshold domain (GET /v1/domains); default: detected.",
    )
    strategy: Literal["cot", "tot"] | None = Field(
        None, description="cot: one chain of rounds; tot: Tree-of-Thought; default: the tier's."
    )
    tot: TotOptions | None = None
    kv_store: bool | None = Field(
        None,
        description="Keep this request's KV in the cluster's KV store across rounds and workers "
        "(default: on when the server has a store); false: nothing of it is stored.",
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=128, description="The chat completion's id.")
    correct: bool


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reviewer: str | None = Field(None, max_length=256)
    note: str | None = Field(None, max_length=4096)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, description="Per-round completion token cap.")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="vLLM extension: generate max_tokens every round.")
    reasoning: ReasoningOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    def conversation(self) -> list[Message]:
        return [Message(m.role, m.text()) for m in self.messages]

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


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
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


def _describe(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
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
        errors = exc.errors()
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
