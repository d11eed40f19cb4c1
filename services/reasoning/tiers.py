"""The tier table and the per-round continue/exit policy (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.reasoning.signals import ExitRule, Signals

TierName = Literal["low", "medium", "high", "critical"]
TIER_NAMES: tuple[str, ...] = TierName.__args__
STRATEGIES = ("cot", "tot")
# An absolute bound on any ceiling: a typo in a config must not let a loop run for hundreds of rounds.
ABSOLUTE_MAX_ROUNDS = 16


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field("", description="What prompts belong in this tier.")
    min_rounds: int = Field(ge=1, le=ABSOLUTE_MAX_ROUNDS, description="Rounds that always run.")
    max_rounds: int = Field(ge=1, le=ABSOLUTE_MAX_ROUNDS, description="Hard round ceiling.")
    confidence_threshold: float | None = Field(
        ge=0.0, le=1.0, description="Exit once a round's confidence reaches this; null = never."
    )
    exit_rule: ExitRule | None = Field(
        None,
        description="More exit criteria (DeepConf group/tail confidence, answer stability); the "
        "threshold above is its entropy criterion. Null: the threshold alone decides.",
    )
    strategy: Literal["cot", "tot"] = Field("cot", description="cot: one chain; tot: Tree-of-Thought.")
    tot: dict[str, Any] | None = Field(
        None, description="Tree-of-Thought settings (services.reasoning.tot.TotConfig) for strategy tot."
    )
    review: bool = Field(False, description="Hold the answer for human review (HTTP 202).")
    segment_tokens: int = Field(
        256,
        ge=8,
        le=8192,
        description="Thinking mode (a model that thinks natively): tokens per segment of its trace. A "
        "segment is a round for depth control, so the tier thinks min_rounds..max_rounds segments.",
    )
    probe_tokens: int = Field(
        0,
        ge=0,
        le=256,
        description="Thinking mode: after a segment, ask the closed trace for its answer in at most this "
        "many tokens (a probe, never part of the trace); agreement of successive probes is the exit "
        "rule's stable_for signal. 0: no probes (the answer the trace itself states is used).",
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> Tier:
        if self.min_rounds > self.max_rounds:
            raise ValueError(f"min_rounds {self.min_rounds} > max_rounds {self.max_rounds}")
        if self.tot is not None:
            from services.reasoning.tot import TotConfig  # validated here: a typo fails at load

            TotConfig.model_validate({**self.tot, "max_depth": self.max_rounds})
        return self


class TierTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_tier: TierName = Field("medium", description="Tier used when a request names none.")
    tiers: dict[TierName, Tier] = Field(
        description="Tier name -> policy; low, medium, high, critical.",
        json_schema_extra={"required": list(TIER_NAMES)},  # the Helm values schema refuses a missing tier
    )

    @model_validator(mode="after")
    def _known_tiers(self) -> TierTable:
        missing = [t for t in TIER_NAMES if t not in self.tiers]
        unknown = [t for t in self.tiers if t not in TIER_NAMES]
        if missing or unknown:
            raise ValueError(f"tiers must be exactly {TIER_NAMES}; missing {missing}, unknown {unknown}")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not a tier")
        return self

    @classmethod
    def load(cls, path: str | Path) -> TierTable:
        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f))


class PlanError(ValueError):
    """A request's reasoning overrides do not fit its tier; the message says what to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# The cluster's ToT node budget had no node for a search's root: the request ran as a chain.
TOT_BUDGET_SPENT = "tot_nodes_in_flight"


@dataclass(frozen=True)
class RoundPlan:
    """One request's reasoning plan. Plain data (JSON-able): it travels to the depth-control actor."""

    tier: str
    min_rounds: int
    max_rounds: int
    confidence_threshold: float | None
    strategy: str = "cot"
    domain: str | None = None
    exit_rule: dict[str, Any] | None = None  # ExitRule fields beyond the entropy threshold
    tot: dict[str, Any] | None = None  # TotConfig fields when strategy == "tot"
    review: bool = False
    degraded: bool = False
    segment_tokens: int = 256  # thinking mode: tokens per segment (a segment is a round)
    mode: str = "thinking"  # for a model that thinks natively: one trace in segments, or "rounds"
    thinking_budget: int | None = None  # thinking mode: the request's exact cap; None = max_rounds segments
    probe_tokens: int = 0  # thinking mode: a probe's token cap after each segment (0: no probes)
    fallback: str | None = None  # why the strategy asked for did not run (TOT_BUDGET_SPENT)

    def rule(self) -> ExitRule | None:
        """The effective exit rule: the tier's rule with this plan's entropy threshold; None = never."""
        rule = ExitRule.model_validate(self.exit_rule or {})
        if self.confidence_threshold is not None:
            rule = rule.model_copy(update={"min_entropy_confidence": self.confidence_threshold})
        return rule if rule.configured else None


def make_plan(
    table: TierTable,
    tier: str | None = None,
    *,
    max_rounds: int | None = None,
    min_rounds: int | None = None,
    confidence_threshold: float | None = None,
    strategy: str | None = None,
    domain: str | None = None,
    domain_threshold: float | None = None,
    tot: dict[str, int] | None = None,
    thinking_budget: int | None = None,
    mode: str | None = None,
) -> RoundPlan:
    """The plan for one request: its tier's policy, narrowed by the request's overrides.

    A request may lower its tier's ceiling but never raise it: the ceiling is the operator's bound.
    """
    name = tier or table.default_tier
    if name not in table.tiers:
        raise PlanError(f"unknown tier {name!r}; use one of {', '.join(TIER_NAMES)}", "reasoning.tier")
    t = table.tiers[name]
    if thinking_budget is not None:
        most = t.max_rounds * t.segment_tokens
        if not 1 <= thinking_budget <= most:
            raise PlanError(
                f"thinking_token_budget must be between 1 and {most} (tier {name!r}: {t.max_rounds} "
                f"segments of {t.segment_tokens} tokens); got {thinking_budget}. Pick a higher tier "
                "for more thinking.",
                "thinking_token_budget",
            )
        segments = -(-thinking_budget // t.segment_tokens)
        max_rounds = segments if max_rounds is None else min(max_rounds, segments)
        min_rounds = None if min_rounds is None else min(min_rounds, max_rounds)
    ceiling = t.max_rounds if max_rounds is None else max_rounds
    if not 1 <= ceiling <= t.max_rounds:
        raise PlanError(
            f"reasoning.max_rounds must be between 1 and {t.max_rounds} (the ceiling of tier "
            f"{name!r}); got {ceiling}. Pick a higher tier for more rounds.",
            "reasoning.max_rounds",
        )
    floor = min(t.min_rounds, ceiling) if min_rounds is None else min_rounds
    if not 1 <= floor <= ceiling:
        raise PlanError(
            f"reasoning.min_rounds must be between 1 and max_rounds ({ceiling}); got {floor}",
            "reasoning.min_rounds",
        )
    # Most specific wins: the request's threshold, then its domain's (calibrated), then the tier's.
    threshold = next(
        (x for x in (confidence_threshold, domain_threshold, t.confidence_threshold) if x is not None), None
    )
    strategy = strategy or t.strategy
    if strategy not in STRATEGIES:
        raise PlanError(
            f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}", "reasoning.strategy"
        )
    return RoundPlan(
        name,
        floor,
        ceiling,
        threshold,
        strategy=strategy,
        domain=domain,
        exit_rule=t.exit_rule.model_dump(exclude_none=True) if t.exit_rule else None,
        tot=_narrow_tot(name, t.tot or {}, tot or {}) if strategy == "tot" else None,
        review=t.review,
        segment_tokens=t.segment_tokens,
        thinking_budget=thinking_budget,
        probe_tokens=t.probe_tokens,
        mode=mode or "thinking",
    )


def _narrow_tot(tier: str, base: dict[str, Any], overrides: dict[str, int]) -> dict[str, Any]:
    """The tier's ToT budgets, narrowed by the request's; a request may not widen them. The depth
    bound is the plan's round ceiling (a path of the tree is a chain of rounds), set by the caller."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        limit = base.get(key)
        if limit is not None and value > limit:
            raise PlanError(
                f"reasoning.tot.{key} must be at most {limit} for tier {tier!r}; got {value}",
                f"reasoning.tot.{key}",
            )
        out[key] = value
    return out


class Action(StrEnum):
    CONTINUE = "continue"
    EXIT = "exit"


class Reason(StrEnum):
    MIN_ROUNDS = "min_rounds"  # continue: the min-round guard holds
    BELOW_THRESHOLD = "below_threshold"  # continue: not confident enough yet
    CONFIDENCE = "confidence"  # exit: confident enough
    STABLE = "stable_answers"  # exit: the answer held across rounds (or probes), no confidence criterion did
    CEILING = "ceiling"  # exit: hard round ceiling reached
    CONTEXT = "context_limit"  # exit: the next round would not fit the model's context
    NODE_BUDGET = "node_budget"  # exit (Tree-of-Thought): node budget spent or not granted
    TRACE_CLOSED = "trace_closed"  # exit (thinking mode): the model closed its trace itself


class DecidedBy(StrEnum):
    """Who settled a round (a round record's `decided_by`)."""

    ROUTER = "router"  # the router, with the pure policy, under the plan depth control granted
    ACTOR = "depth_control"  # the depth-control actor, asked for this round (verdicts: actor)
    LOCAL = "local"  # the router alone: depth control was unreachable; the plan's hard ceilings hold


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: Reason
    detail: tuple[str, ...] = field(default=(), compare=False)  # the exit rule's criteria, explained
    by: DecidedBy = field(default=DecidedBy.ROUTER, compare=False)

    @property
    def exit(self) -> bool:
        return self.action is Action.EXIT


def decide(plan: RoundPlan, rounds_done: int, signals: Signals | float | None) -> Verdict:
    """Continue or exit after `rounds_done` completed rounds, the last with these signals (a bare
    float is its entropy confidence). The ceiling and min_rounds come first: no signal bypasses them."""
    if rounds_done >= plan.max_rounds:
        return Verdict(Action.EXIT, Reason.CEILING)
    if rounds_done < plan.min_rounds:
        return Verdict(Action.CONTINUE, Reason.MIN_ROUNDS)
    rule = plan.rule()
    if rule is None or signals is None:
        return Verdict(Action.CONTINUE, Reason.BELOW_THRESHOLD)
    if not isinstance(signals, Signals):
        signals = Signals.of_confidence(signals)
    if signals.has_answer is False:
        return Verdict(Action.CONTINUE, Reason.BELOW_THRESHOLD, ("no final answer",))
    ok, detail = rule.satisfied(signals, signals.stable_rounds)
    if not ok:
        return Verdict(Action.CONTINUE, Reason.BELOW_THRESHOLD, tuple(detail))
    # Said apart, so a probe exit is not counted as a confidence exit (online feedback tunes the
    # confidence threshold on the latter only).
    reason = Reason.CONFIDENCE if rule.confident(signals) else Reason.STABLE
    return Verdict(Action.EXIT, reason, tuple(detail))
