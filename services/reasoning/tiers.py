"""The tier table and the per-round continue/exit policy (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

TIER_NAMES = ("low", "medium", "high", "critical")
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

    @model_validator(mode="after")
    def _min_le_max(self) -> Tier:
        if self.min_rounds > self.max_rounds:
            raise ValueError(f"min_rounds {self.min_rounds} > max_rounds {self.max_rounds}")
        return self


class TierTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_tier: str = Field("medium", description="Tier used when a request names none.")
    tiers: dict[str, Tier] = Field(description="Tier name -> policy; low, medium, high, critical.")

    @model_validator(mode="after")
    def _known_tiers(self) -> TierTable:
        missing = [t for t in TIER_NAMES if t not in self.tiers]
        unknown = [t for t in self.tiers if t not in TIER_NAMES]
        if missing or unknown:
            raise ValueError(
                f"tiers must be exactly {TIER_NAMES}; missing {missing}, unknown {unknown}"
            )
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


@dataclass(frozen=True)
class RoundPlan:
    tier: str
    min_rounds: int
    max_rounds: int
    confidence_threshold: float | None


def make_plan(
    table: TierTable,
    tier: str | None = None,
    *,
    max_rounds: int | None = None,
    min_rounds: int | None = None,
    confidence_threshold: float | None = None,
) -> RoundPlan:
    """The plan for one request: its tier's policy, narrowed by the request's overrides.

    A request may lower its tier's ceiling but never raise it: the ceiling is the operator's bound.
    """
    name = tier or table.default_tier
    if name not in table.tiers:
        raise PlanError(
            f"unknown tier {name!r}; use one of {', '.join(TIER_NAMES)}", "reasoning.tier"
        )
    t = table.tiers[name]
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
    threshold = t.confidence_threshold if confidence_threshold is None else confidence_threshold
    return RoundPlan(name, floor, ceiling, threshold)


class Action(StrEnum):
    CONTINUE = "continue"
    EXIT = "exit"


class Reason(StrEnum):
    MIN_ROUNDS = "min_rounds"  # continue: the min-round guard holds
    BELOW_THRESHOLD = "below_threshold"  # continue: not confident enough yet
    CONFIDENCE = "confidence"  # exit: confident enough
    CEILING = "ceiling"  # exit: hard round ceiling reached
    CONTEXT = "context_limit"  # exit: the next round would not fit the model's context


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: Reason

    @property
    def exit(self) -> bool:
        return self.action is Action.EXIT


def decide(plan: RoundPlan, rounds_done: int, confidence: float | None) -> Verdict:
    """Continue or exit after `rounds_done` completed rounds, the last with `confidence`."""
    if rounds_done >= plan.max_rounds:
        return Verdict(Action.EXIT, Reason.CEILING)
    if rounds_done < plan.min_rounds:
        return Verdict(Action.CONTINUE, Reason.MIN_ROUNDS)
    threshold = plan.confidence_threshold
    if threshold is not None and confidence is not None and confidence >= threshold:
        return Verdict(Action.EXIT, Reason.CONFIDENCE)
    return Verdict(Action.CONTINUE, Reason.BELOW_THRESHOLD)
