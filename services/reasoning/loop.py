"""The round loop's state machine (pure): what each round is for, and when the loop ends.

Depth control is the authority on the plan (ceilings, min rounds, the exit rule, granted at
admission); verdicts under it come from the router or, where the plan says so, the actor. The loop
re-checks every verdict against its own plan: the ceiling and the min-round guard hold even when a
verdict is wrong or depth control is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from services.reasoning.signals import Signals
from services.reasoning.tiers import Action, DecidedBy, Reason, RoundPlan, Verdict, decide


class StreamRole(StrEnum):
    """How a round's text can be streamed before the round ends."""

    REASONING = "reasoning"  # cannot be the last round: stream as reasoning_content
    FINAL = "final"  # must be the last round (the ceiling): stream as content
    UNDECIDED = "undecided"  # may end the loop on confidence: hold until the verdict


def round_role(plan: RoundPlan, index: int) -> StreamRole:
    done_after = index + 1
    if done_after >= plan.max_rounds:
        return StreamRole.FINAL
    if done_after < plan.min_rounds or plan.rule() is None:
        return StreamRole.REASONING
    return StreamRole.UNDECIDED


@dataclass
class RoundRecord:
    index: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    confidence: float | None
    latency_ms: float
    ttft_ms: float
    decision: str = ""
    decided_by: str = ""
    signals: Signals | None = None
    answer: str | None = None  # the extracted, normalised final answer
    detail: tuple[str, ...] = ()  # why the exit rule held or not
    pruned: dict | None = None  # how this round's prompt was cut to fit the context, if it was
    kv_loaded_tokens: int = 0  # prompt tokens the KV store supplied (the rest of cached_tokens: local)
    worker: str = ""  # the worker replica that ran the round
    finish_reason: str = "stop"  # the engine's: "length" when the round was cut at max_tokens
    closed: bool = False  # cut before its answer line, the router wrote "Final answer:" (loop/closing.py)

    def signals_or_confidence(self) -> Signals | float | None:
        return self.signals if self.signals is not None else self.confidence

    def summary(self) -> dict[str, object]:
        return {
            "index": self.index,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "worker": self.worker,
            "finish_reason": self.finish_reason,
            "closed": self.closed,
            "kv_cached_tokens": max(self.cached_tokens - self.kv_loaded_tokens, 0),
            "kv_loaded_tokens": self.kv_loaded_tokens,
            "confidence": None if self.confidence is None else round(self.confidence, 4),
            "latency_ms": round(self.latency_ms, 2),
            "ttft_ms": round(self.ttft_ms, 2),
            "decision": self.decision,
            "decided_by": self.decided_by,
            "answer": self.answer,
            "signals": _signals_summary(self.signals),
            "exit_rule": list(self.detail),
            "pruned": self.pruned,
        }


def _signals_summary(s: Signals | None) -> dict[str, object] | None:
    if s is None:
        return None

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "lowest_group_confidence": r(s.lowest_group_confidence),
        "tail_confidence": r(s.tail_confidence),
        "mean_token_confidence": r(s.mean_token_confidence),
        "stable_rounds": s.stable_rounds,
    }


@dataclass
class RoundLoop:
    plan: RoundPlan
    rounds: list[RoundRecord] = field(default_factory=list)
    exit_reason: Reason | None = None

    @property
    def next_index(self) -> int:
        return len(self.rounds)

    @property
    def done(self) -> bool:
        return self.exit_reason is not None

    def guarded(self, signals: Signals | float | None) -> bool:
        """Whether the local guards alone decide the round about to be settled."""
        local = decide(self.plan, len(self.rounds) + 1, signals)
        return local.reason in (Reason.CEILING, Reason.MIN_ROUNDS)

    def settle(self, record: RoundRecord, remote: Verdict | None) -> Verdict:
        """Record a finished round and settle its verdict: the remote one, within local guards."""
        if self.done:
            raise RuntimeError("the loop has already ended")
        self.rounds.append(record)
        local = decide(self.plan, len(self.rounds), record.signals_or_confidence())
        guarded = local.reason in (Reason.CEILING, Reason.MIN_ROUNDS)
        verdict = local if remote is None or guarded else remote
        record.decision = verdict.reason.value
        record.detail = verdict.detail
        if remote is None:
            record.decided_by = DecidedBy.LOCAL.value  # no verdict came: depth control is unreachable
        elif guarded and remote != local:
            record.decided_by = DecidedBy.ROUTER.value  # the plan's own guard overrode the verdict
        else:
            record.decided_by = remote.by.value
        if verdict.action is Action.EXIT:
            self.exit_reason = verdict.reason
        return verdict

    def stop(self, reason: Reason) -> None:
        """End the loop without another round (e.g. the next prompt would not fit the context)."""
        if not self.rounds:
            raise RuntimeError("cannot stop before the first round")
        self.exit_reason = reason
        self.rounds[-1].decision = reason.value
        self.rounds[-1].decided_by = DecidedBy.ROUTER.value

    @property
    def final(self) -> RoundRecord:
        return self.rounds[-1]

    @property
    def earlier(self) -> list[RoundRecord]:
        return self.rounds[:-1]
