"""One request's plan, made once (pure): its tier (named, or scored from the prompt), its domain
(named, or detected), the tier's policy narrowed by the request, then what depth control's admission
changes — the domain's live threshold and lower ceilings under pressure.

The router calls `plan` before admission (admission needs the plan's tier and ceilings) and
`admitted` after it; nothing is planned twice. Errors are `PlanError`s naming the request field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from services.reasoning.complexity import ComplexityConfig, pick_tier
from services.reasoning.domains import DomainRegistry, detect_domain
from services.reasoning.tiers import PlanError, RoundPlan, TierTable, make_plan


@dataclass(frozen=True)
class PlanRequest:
    """What a chat request says about its reasoning (all optional but the text)."""

    user_text: str
    tier: str | None = None
    domain: str | None = None
    max_rounds: int | None = None
    min_rounds: int | None = None
    confidence_threshold: float | None = None
    strategy: str | None = None
    tot: dict[str, int] | None = None
    thinking_budget: int | None = None
    mode: str | None = None


@dataclass(frozen=True)
class Planned:
    plan: RoundPlan
    tier_reason: str  # "requested", or what the complexity scorer saw
    domain_reason: str  # "requested", or what detection matched


@dataclass(frozen=True)
class Admission:
    """Depth control's answer at admission (services/control/depth_control.py `admit`)."""

    max_rounds: int
    min_rounds: int
    domain_threshold: float | None = None
    degraded: bool = False
    reasons: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Admission:
        return cls(
            int(d["max_rounds"]),
            int(d["min_rounds"]),
            d.get("domain_threshold"),
            bool(d.get("degraded", False)),
            tuple(d.get("reasons") or ()),
        )


class RequestPlanner:
    def __init__(self, tiers: TierTable, complexity: ComplexityConfig, domains: DomainRegistry) -> None:
        self.tiers, self.complexity, self.domains = tiers, complexity, domains

    def plan(self, req: PlanRequest) -> Planned:
        tier, tier_reason = pick_tier(req.tier, req.user_text, self.complexity)
        if req.domain is not None and req.domain not in self.domains.domains:
            raise PlanError(
                f"unknown domain {req.domain!r}; use one of {', '.join(self.domains.domains)}",
                "reasoning.domain",
            )
        if req.domain:
            domain, domain_reason = req.domain, "requested"
        else:
            domain, domain_reason = detect_domain(req.user_text, self.domains)
        plan = make_plan(
            self.tiers,
            tier,
            max_rounds=req.max_rounds,
            min_rounds=req.min_rounds,
            confidence_threshold=req.confidence_threshold,
            strategy=req.strategy,
            domain=domain,
            tot=req.tot,
            thinking_budget=req.thinking_budget,
            mode=req.mode,
        )
        plan, strategy_reason = self._tree_only_where_it_pays(plan, req, domain)
        if strategy_reason:
            tier_reason = f"{tier_reason}; {strategy_reason}"
        return Planned(plan, tier_reason, domain_reason)

    def _tree_only_where_it_pays(
        self, plan: RoundPlan, req: PlanRequest, domain: str
    ) -> tuple[RoundPlan, str]:
        """A tier's Tree-of-Thought runs only where the client asked for it (`strategy: tot` or a `tot`
        object) or the domain's evidence says ToT beats a chain of the same tokens; otherwise the tier
        runs as a chain with its ceiling, so the spend is the ceiling's chain cost at most."""
        if plan.strategy != "tot":
            return plan, ""
        if req.strategy == "tot" or req.tot is not None:
            return plan, "Tree-of-Thought: requested"
        d = self.domains.domains.get(domain)
        evidence = d.tot if d is not None else None
        if evidence is not None and evidence.pays:
            return plan, evidence.reason(domain)
        chain = dataclasses.replace(plan, strategy="cot", tot=None)
        why = (
            evidence.reason(domain)
            if evidence is not None
            else f"no evidence that Tree-of-Thought pays on {domain}"
        )
        return chain, f"chain: {why}"

    @staticmethod
    def admitted(plan: RoundPlan, req: PlanRequest, admission: Admission | None) -> RoundPlan:
        """The plan under admission: the domain's live threshold where the request named none (most
        specific wins, as in `make_plan`), ceilings lowered to what was granted. None: unreachable,
        the plan's own ceilings hold."""
        if admission is None:
            return plan
        if admission.domain_threshold is not None and req.confidence_threshold is None:
            plan = dataclasses.replace(plan, confidence_threshold=admission.domain_threshold)
        if admission.max_rounds < plan.max_rounds or admission.min_rounds < plan.min_rounds:
            plan = dataclasses.replace(
                plan,
                max_rounds=min(plan.max_rounds, admission.max_rounds),
                min_rounds=min(plan.min_rounds, admission.min_rounds),
                degraded=admission.degraded,
            )
        return plan
