"""The chat route's parts, so the route reads validate → plan → run → respond: the request checks,
its sampling settings, what its reasoning asks for, and the accounting that wraps the loop's events
(metrics, log lines, token limits, depth control and the KV store told the session ended)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from services.config import RouterConfig
from services.control.client import Control, DepthClient, RecordsClient
from services.ingress import access
from services.ingress.api import ApiError, ChatRequest, ReasoningOptions
from services.ingress.metrics import Recorder, log_request, log_round
from services.ingress.responses import degraded_reasons
from services.loop.events import Event, Finished, Outcome, RoundDone
from services.reasoning.planning import PlanRequest
from services.reasoning.tiers import PlanError, RoundPlan
from services.worker.engine import SamplingSpec


def check(req: ChatRequest, model: str, rcfg: RouterConfig) -> None:
    """What the request schema cannot know: the served model, this server's message limit."""
    if req.model != model:
        raise ApiError(
            404,
            f"The model '{req.model}' does not exist; this server serves '{model}'.",
            param="model",
            code="model_not_found",
        )
    if len(req.messages) > rcfg.max_messages:
        raise ApiError(
            400,
            f"At most {rcfg.max_messages} messages per request; got {len(req.messages)}.",
            param="messages",
        )


def sampling(req: ChatRequest, rcfg: RouterConfig) -> SamplingSpec:
    """Per-round sampling: the request's settings within this server's limits."""
    cap = req.max_completion_tokens or req.max_tokens or rcfg.default_max_tokens
    if cap > rcfg.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens must be at most {rcfg.max_tokens_limit} per round; got {cap}",
            param="max_tokens",
        )
    return SamplingSpec(
        max_tokens=cap,
        temperature=rcfg.default_temperature if req.temperature is None else req.temperature,
        top_p=req.top_p or 1.0,
        seed=req.seed,
        stop=req.stop_list(),
        top_logprobs=rcfg.top_logprobs,
        ignore_eos=req.ignore_eos,
        completion_budget=req.max_completion_tokens,
    )


def plan_request(req: ChatRequest, thinks: bool = False) -> PlanRequest:
    """What the request asks of its reasoning, for the planner (services/reasoning/planning.py).
    OpenAI's `reasoning_effort` names a tier; PlanError when it contradicts `reasoning.tier`, and
    when `thinking_token_budget` asks to bound a trace that will not be written (`thinks`: the
    served model writes one)."""
    r = req.reasoning or ReasoningOptions()
    if req.thinking_token_budget is not None and (not thinks or r.mode == "rounds"):
        why = "this request runs in round mode" if thinks else "the served model does not think"
        raise PlanError(
            f"thinking_token_budget bounds a thinking trace, and {why} (thinking mode needs a model "
            "whose chat template opens a trace, or engine.reasoning markers); bound its rounds with "
            "reasoning.max_rounds instead",
            "thinking_token_budget",
        )
    tier = r.tier
    if req.reasoning_effort is not None:
        if tier is not None and tier != req.reasoning_effort:
            raise PlanError(
                f"reasoning_effort {req.reasoning_effort!r} and reasoning.tier {tier!r} disagree; "
                "set one of them",
                "reasoning_effort",
            )
        tier = req.reasoning_effort
    return PlanRequest(
        user_text="\n".join(m.text() for m in req.messages if m.role == "user"),
        tier=tier,
        domain=r.domain,
        max_rounds=r.max_rounds,
        min_rounds=r.min_rounds,
        confidence_threshold=r.confidence_threshold,
        strategy=r.strategy,
        tot=r.tot.model_dump(exclude_none=True) if r.tot else None,
        thinking_budget=req.thinking_token_budget,
        mode=r.mode,
    )


@dataclass
class Accounting:
    """Where a finished session is reported."""

    metrics: Recorder
    depth: DepthClient
    records: RecordsClient
    auth: Any  # access.load's result; None when no keys are configured
    default_domain: str
    on_exit: Callable[[str], None] = lambda session: None  # e.g. the KV store's mark_exited


async def accounted(
    acc: Accounting, rid: str, key: str, events: AsyncIterator[Event], control: Control, plan: RoundPlan
) -> AsyncIterator[Event]:
    """Pass the loop's events through; whatever happens, record the request's metrics and log lines,
    its tokens against its key, tell depth control and the KV store that the session ended, and keep
    its record for feedback."""
    outcome, status = None, "error"
    try:
        async for ev in events:
            if isinstance(ev, RoundDone):
                acc.metrics.round(plan.tier, ev.record, ev.verdict, ev.answers)
                log_round(rid, plan, ev.record, ev.verdict)
            if isinstance(ev, Finished):
                outcome, status = ev.outcome, "ok"
            yield ev
    except (asyncio.CancelledError, GeneratorExit):
        status = "cancelled"  # the client went away
        raise
    finally:
        acc.metrics.request(
            outcome, plan.tier, plan.strategy, status, degraded_reasons(outcome, control.reasons)
        )
        log_request(rid, plan, outcome, status, control, api_key=key if acc.auth is not None else "-")
        tokens = outcome.total_completion_tokens if outcome else 0
        access.record_tokens(acc.auth, key, tokens)
        acc.depth.finish(
            rid, key, tokens, round_reports(outcome), report_context(outcome, acc.default_domain)
        )
        acc.records.record(rid, finished_record(outcome, acc.default_domain))
        acc.on_exit(rid)  # its trace goes first when a shard needs room (kept while there is room)


def report_context(o: Outcome | None, default_domain: str) -> dict | None:
    """What the round reports were: only a chain's rounds (not ToT nodes, not thinking segments)
    teach depth control what later rounds are worth."""
    if o is None:
        return None
    chain = o.tot is None and o.thinking is None and o.plan.strategy == "cot"
    return {"domain": o.plan.domain or default_domain, "tier": o.plan.tier, "chain": chain}


def round_reports(o: Outcome | None) -> list[dict]:
    """Per-round outcomes of a chain, as depth control takes them at finish (statistics and
    calibration; verdicts never wait on them). Tree-of-Thought nodes are not rounds of a chain."""
    if o is None:
        return []
    out, previous = [], None
    for r in o.rounds:
        if r.decided_by == "tot":
            continue
        out.append(
            {
                "decision": r.decision,
                "decided_by": r.decided_by,
                "confidence": r.confidence,
                "completion_tokens": r.completion_tokens,
                "answer_changed": previous is not None and r.answer != previous,
            }
        )
        previous = r.answer
    return out


def finished_record(o: Outcome | None, default_domain: str) -> dict | None:
    """What the records actor keeps of a finished request (feedback, statistics)."""
    if o is None:
        return None
    last = o.rounds[-1] if o.rounds else None
    return {
        "domain": o.plan.domain or default_domain,
        "tier": o.plan.tier,
        "strategy": o.plan.strategy,
        "exit_reason": o.exit_reason.value,
        "confidence": None if last is None else last.confidence,
        "rounds": len(o.rounds),
        "completion_tokens": o.total_completion_tokens,
    }
