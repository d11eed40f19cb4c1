"""Turns orchestrator events into OpenAI ChatCompletion JSON or SSE chunks (pure)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.control.client import Control
from services.loop.orchestrator import ContentDelta, Event, Finished, Outcome, ReasoningDelta


@dataclass(frozen=True)
class Meta:
    id: str
    model: str
    created: int
    tier_reason: str = "requested"
    domain_reason: str = "requested"
    control: Control = field(default_factory=Control)  # filled in while the request runs


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def review_id(request_id: str) -> str:
    return "review-" + request_id.removeprefix("chatcmpl-")


def proposed(completion: dict) -> dict:
    """What a reviewer judges: the held answer, its reasoning and the loop's summary."""
    message = completion["choices"][0]["message"]
    return {
        "content": message["content"],
        "reasoning_content": message.get("reasoning_content", ""),
        "reasoning": completion["reasoning"],
    }


def review_view(row: dict) -> dict:
    """A review as the API shows it; the completion itself is released only once approved."""
    return {
        "id": row["id"],
        "object": "chat.completion.review",
        "status": row["status"],
        "request_id": row["request_id"],
        "tier": row["tier"],
        "domain": row["domain"],
        "created_at": row["created_at"],
        "decided_at": row["decided_at"],
        "reviewer": row["reviewer"],
        "note": row["note"],
        "proposed": row["proposed"],
        "completion": row["completion"] if row["status"] == "approved" else None,
    }


def usage(o: Outcome) -> dict:
    return {
        "prompt_tokens": o.total_prompt_tokens,
        "completion_tokens": o.total_completion_tokens,
        "total_tokens": o.total_prompt_tokens + o.total_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": o.total_reasoning_tokens},
    }


def degraded_reasons(o: Outcome | None, control_reasons: list[str]) -> list[str]:
    """Why the request got less than it asked for: admission's reasons, then the run's own (a ToT
    search whose root found no node in the cluster's budget ran as a chain)."""
    fallback = o.plan.fallback if o is not None else None
    return [*control_reasons, fallback] if fallback else list(control_reasons)


def control_summary(o: Outcome, meta: Meta) -> dict:
    summary = meta.control.summary()
    reasons = degraded_reasons(o, summary["degraded_reasons"])
    return summary | {"degraded": summary["degraded"] or bool(reasons), "degraded_reasons": reasons}


def reasoning_summary(o: Outcome, meta: Meta) -> dict:
    return {
        "tier": o.plan.tier,
        "tier_reason": meta.tier_reason,
        "domain": o.plan.domain,
        "domain_reason": meta.domain_reason,
        "strategy": o.plan.strategy,
        "exit_reason": o.exit_reason.value,
        "min_rounds": o.plan.min_rounds,
        "max_rounds": o.plan.max_rounds,
        "confidence_threshold": o.plan.confidence_threshold,
        "exit_rule": o.plan.exit_rule,
        **control_summary(o, meta),
        "tot": o.tot,
        "thinking": o.thinking,
        "rounds": [r.summary() for r in o.rounds],
    }


async def complete(events: AsyncIterator[Event], meta: Meta) -> dict:
    outcome: Outcome | None = None
    async for ev in events:
        if isinstance(ev, Finished):
            outcome = ev.outcome
    assert outcome is not None
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": outcome.content,
                    "reasoning_content": outcome.reasoning_content,
                },
                "finish_reason": outcome.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(outcome),
        "reasoning": reasoning_summary(outcome, meta),
    }


def _chunk(meta: Meta, delta: dict, finish: str | None = None, **extra: object) -> str:
    body = {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


async def sse(events: AsyncIterator[Event], meta: Meta, include_usage: bool) -> AsyncIterator[str]:
    """Earlier rounds as `reasoning_content` deltas, the final answer as `content` deltas, then a
    finish chunk carrying the `reasoning` summary (and a usage chunk when asked for)."""
    yield _chunk(meta, {"role": "assistant", "content": ""})
    try:
        async for ev in events:
            if isinstance(ev, ReasoningDelta) and ev.text:
                yield _chunk(meta, {"reasoning_content": ev.text})
            elif isinstance(ev, ContentDelta) and ev.text:
                yield _chunk(meta, {"content": ev.text})
            elif isinstance(ev, Finished):
                o = ev.outcome
                yield _chunk(meta, {}, o.finish_reason, reasoning=reasoning_summary(o, meta))
                if include_usage:
                    body = {
                        "id": meta.id,
                        "object": "chat.completion.chunk",
                        "created": meta.created,
                        "model": meta.model,
                        "choices": [],
                        "usage": usage(o),
                    }
                    yield f"data: {json.dumps(body)}\n\n"
    except Exception as exc:  # headers are sent: report in-band, OpenAI-shaped, then end the stream
        err = {
            "error": {
                "message": f"generation failed: {type(exc).__name__}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        yield f"data: {json.dumps(err)}\n\n"
    yield "data: [DONE]\n\n"
