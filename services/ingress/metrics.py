"""Ponder's Prometheus metrics, through Ray's metrics API (exported as `ray_ponder_*` on each node's
metrics port and shown in the Ray dashboard).

Labels have bounded cardinality — tier, strategy, exit reason, status, decision, token kind, tier of
the store — never a session, request or replica id. `Recorder` turns the router's events into
observations; it takes a metric factory so that its logic is tested without Ray (tests/unit).
Create a `Recorder` inside a replica's or actor's `__init__`, not at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from services.loop.orchestrator import Outcome
from services.reasoning.budgets import reason_budget
from services.reasoning.loop import RoundRecord
from services.reasoning.tiers import Verdict

log = logging.getLogger("ponder.requests")

LATENCY_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
# A router's own verdict takes microseconds; an actor round trip, milliseconds (more under load).
VERDICT_S = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
ROUNDS = (1, 2, 3, 4, 5, 6, 8, 10, 16)
CONFIDENCE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
NODES = (1, 2, 4, 8, 16, 32, 64)
THINKING_TOKENS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# name -> (kind, description, tag keys, histogram boundaries)
SPECS: dict[str, tuple[str, str, tuple[str, ...], Sequence[float] | None]] = {
    "ponder_requests": (
        "counter",
        "Requests by tier, strategy, exit reason and status.",
        ("tier", "strategy", "exit_reason", "status"),
        None,
    ),
    "ponder_rounds_per_request": (
        "histogram",
        "Rounds run per request (ToT: the best path).",
        ("tier", "strategy"),
        ROUNDS,
    ),
    "ponder_round_tokens": (
        "counter",
        "Tokens per round by kind: prompt, completion, reasoning, "
        "kv_cached (local prefix cache), kv_loaded (KV store), probe (thinking mode's answer probes, "
        "also counted as completion and reasoning).",
        ("tier", "kind"),
        None,
    ),
    "ponder_round_latency_seconds": ("histogram", "Round latency.", ("tier",), LATENCY_S),
    "ponder_round_ttft_seconds": ("histogram", "Per-round time to first token.", ("tier",), LATENCY_S),
    "ponder_exit_confidence": (
        "histogram",
        "Confidence of the final round.",
        ("tier", "exit_reason"),
        CONFIDENCE,
    ),
    "ponder_tokens_saved_by_early_exit": (
        "counter",
        "Completion tokens not spent because a request "
        "exited before its tier ceiling (estimated at its mean round).",
        ("tier",),
        None,
    ),
    "ponder_tot_nodes_per_request": ("histogram", "Tree-of-Thought nodes per request.", ("tier",), NODES),
    "ponder_thinking_tokens_per_request": (
        "histogram",
        "Thinking mode: tokens of the request's trace, by how the trace was closed "
        "(the exit reason: trace_closed, ceiling, confidence, stable_answers, context_limit, node_budget).",
        ("tier", "closed_by"),
        THINKING_TOKENS,
    ),
    "ponder_thinking_segments": (
        "counter",
        "Thinking mode: segments of traces run (a segment is a round for depth control).",
        ("tier",),
        None,
    ),
    "ponder_thinking_probes": (
        "counter",
        "Thinking mode: answer probes run after segments (result: answered, or none when it hesitated).",
        ("tier", "result"),
        None,
    ),
    "ponder_depth_decisions": (
        "counter",
        "Depth-control decisions after each round.",
        ("decision", "decided_by"),
        None,
    ),
    "ponder_depth_decision_seconds": (
        "histogram",
        "Time a round waited for its verdict: the router's own under the granted plan, or an actor call.",
        ("decided_by",),
        VERDICT_S,
    ),
    "ponder_round_retries": (
        "counter",
        "Rounds resumed on another worker because theirs died (kind: generate, expand).",
        ("kind",),
        None,
    ),
    "ponder_degraded_requests": (
        "counter",
        "Requests admitted with lowered ceilings (brownout).",
        ("reason",),
        None,
    ),
}


def ray_factory(kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries) -> Any:
    from ray.util import metrics

    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=tag_keys)
    if kind == "gauge":
        return metrics.Gauge(name, description, tag_keys=tag_keys)
    return metrics.Histogram(name, description, boundaries=list(boundaries), tag_keys=tag_keys)


def _emit(metric: Any, kind: str, value: float, tags: dict[str, str]) -> None:
    if kind == "counter":
        if value > 0:
            metric.inc(value, tags=tags)
    elif kind == "gauge":
        metric.set(value, tags=tags)
    else:
        metric.observe(value, tags=tags)


class Recorder:
    def __init__(self, factory: Callable[..., Any] = ray_factory) -> None:
        self.kinds = {name: spec[0] for name, spec in SPECS.items()}
        self.m = {
            name: factory(kind, name, desc, tags, bounds)
            for name, (kind, desc, tags, bounds) in SPECS.items()
        }

    def _put(self, name: str, value: float, **tags: str) -> None:
        _emit(self.m[name], self.kinds[name], value, tags)

    def round(self, tier: str, record: RoundRecord, verdict: Verdict | None, last: bool) -> None:
        self._put("ponder_round_latency_seconds", record.latency_ms / 1000, tier=tier)
        self._put("ponder_round_ttft_seconds", record.ttft_ms / 1000, tier=tier)
        kinds = {
            "prompt": record.prompt_tokens,
            "completion": record.completion_tokens,
            "reasoning": 0 if last else record.completion_tokens,
            "kv_cached": max(record.cached_tokens - record.kv_loaded_tokens, 0),
            "kv_loaded": record.kv_loaded_tokens,
        }
        for kind, n in kinds.items():
            self._put("ponder_round_tokens", n, tier=tier, kind=kind)
        if verdict is not None:
            self._put(
                "ponder_depth_decisions",
                1,
                decision=verdict.reason.value,
                decided_by=record.decided_by or "local",
            )

    def retry(self, kind: str) -> None:
        self._put("ponder_round_retries", 1, kind=kind)

    def decision_latency(self, seconds: float, decided_by: str) -> None:
        self._put("ponder_depth_decision_seconds", seconds, decided_by=decided_by)

    def request(
        self,
        outcome: Outcome | None,
        tier: str,
        strategy: str,
        status: str,
        degraded_reasons: Sequence[str] = (),
    ) -> None:
        exit_reason = outcome.exit_reason.value if outcome is not None else "none"
        self._put("ponder_requests", 1, tier=tier, strategy=strategy, exit_reason=exit_reason, status=status)
        for reason in degraded_reasons:
            self._put("ponder_degraded_requests", 1, reason=reason_budget(reason))
        if outcome is None or not outcome.rounds:
            return
        rounds = outcome.rounds
        self._put("ponder_rounds_per_request", len(rounds), tier=tier, strategy=strategy)
        if rounds[-1].confidence is not None:
            self._put("ponder_exit_confidence", rounds[-1].confidence, tier=tier, exit_reason=exit_reason)
        if outcome.tot is not None:
            self._put("ponder_tot_nodes_per_request", outcome.tot.get("nodes", 0), tier=tier)
            # A search reports no rounds as it goes: count every node's tokens once it is done.
            for kind, n in (
                ("prompt", outcome.total_prompt_tokens),
                ("completion", outcome.total_completion_tokens),
                ("reasoning", outcome.total_reasoning_tokens),
            ):
                self._put("ponder_round_tokens", n, tier=tier, kind=kind)
            return
        if outcome.thinking is not None:
            self._thinking(outcome, tier)
            rounds = rounds[:-1]  # the segments; the answer after the trace is not one
        skipped = outcome.plan.max_rounds - len(rounds)
        mean = sum(r.completion_tokens for r in rounds) / max(len(rounds), 1)
        self._put("ponder_tokens_saved_by_early_exit", max(skipped, 0) * mean, tier=tier)

    def _thinking(self, outcome: Outcome, tier: str) -> None:
        """A thinking-mode request: its trace, segments and probes; the answer and the probes' tokens
        (segments were counted as rounds as they ran)."""
        t = outcome.thinking or {}
        self._put(
            "ponder_thinking_tokens_per_request", t["thinking_tokens"], tier=tier, closed_by=t["closed_by"]
        )
        self._put("ponder_thinking_segments", t["segments"], tier=tier)
        for probe in t["probes"]:
            self._put(
                "ponder_thinking_probes",
                1,
                tier=tier,
                result="none" if probe["answer"] is None else "answered",
            )
        answer, probes = outcome.rounds[-1], t["probe_tokens"]
        probe_prompt = outcome.total_prompt_tokens - outcome.prompt_tokens
        for kind, n in (
            ("prompt", answer.prompt_tokens + probe_prompt),
            ("completion", answer.completion_tokens + probes),
            ("reasoning", probes),
            ("probe", probes),
            ("kv_cached", max(answer.cached_tokens - answer.kv_loaded_tokens, 0)),
            ("kv_loaded", answer.kv_loaded_tokens),
        ):
            self._put("ponder_round_tokens", n, tier=tier, kind=kind)


def log_round(rid: str, plan: Any, record: RoundRecord, verdict: Verdict) -> None:
    """One line per round: ids, tier, tokens, confidence, decision (never prompt or answer text)."""
    log.info(
        "round request_id=%s session=%s tier=%s strategy=%s round=%d worker=%s prompt_tokens=%d "
        "completion_tokens=%d kv_cached_tokens=%d kv_loaded_tokens=%d confidence=%s latency_ms=%.1f "
        "ttft_ms=%.1f decision=%s reason=%s decided_by=%s",
        rid,
        rid,
        plan.tier,
        plan.strategy,
        record.index,
        record.worker or "-",
        record.prompt_tokens,
        record.completion_tokens,
        max(record.cached_tokens - record.kv_loaded_tokens, 0),
        record.kv_loaded_tokens,
        _fmt(record.confidence),
        record.latency_ms,
        record.ttft_ms,
        verdict.action.value,
        verdict.reason.value,
        record.decided_by or "local",
    )


def log_request(
    rid: str, plan: Any, outcome: Outcome | None, status: str, control: Any, api_key: str = "-"
) -> None:
    """One line per request when it ends, whatever the end. `api_key` is the key's configured name
    ("-" without authentication), never the key or its hash."""
    rounds = outcome.rounds if outcome is not None else []
    log.info(
        "request request_id=%s session=%s api_key=%s tier=%s strategy=%s status=%s exit_reason=%s "
        "rounds=%d max_rounds=%d prompt_tokens=%d completion_tokens=%d reasoning_tokens=%d confidence=%s "
        "degraded=%s",
        rid,
        rid,
        api_key,
        plan.tier,
        plan.strategy,
        status,
        outcome.exit_reason.value if outcome is not None else "none",
        len(rounds),
        plan.max_rounds,
        outcome.total_prompt_tokens if outcome is not None else 0,
        outcome.total_completion_tokens if outcome is not None else 0,
        outcome.total_reasoning_tokens if outcome is not None else 0,
        _fmt(rounds[-1].confidence if rounds else None),
        bool(getattr(control, "degraded", False)),
    )


def send_logs_to_replica_log() -> None:
    """Inside a Serve replica, make Ponder's loggers (`ponder.*`, info and up) write into the replica's
    log file. Serve sets up only its own `ray.serve` logger; without this, info lines such as
    `ponder.requests` reach no handler and are lost."""
    handlers = logging.getLogger("ray.serve").handlers
    if not handlers:
        return  # not in a replica: leave logging as the process set it up
    ponder = logging.getLogger("ponder")
    ponder.setLevel(logging.INFO)
    for h in handlers:
        if h not in ponder.handlers:
            ponder.addHandler(h)
    ponder.propagate = False


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
