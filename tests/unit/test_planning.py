"""The request planner (services/reasoning/planning.py): Tree-of-Thought only where it is asked for or
shown to pay; whatever the scorer picks, a request that did not ask for ToT spends at most its tier
ceiling's chain (a seeded random property test)."""

from __future__ import annotations

import random

from services.config import DEFAULT_CONFIG, AppConfig
from services.reasoning.complexity import ComplexityConfig
from services.reasoning.domains import DomainRegistry, TotEvidence
from services.reasoning.planning import PlanRequest, RequestPlanner
from services.reasoning.tiers import TIER_NAMES, TierTable

CFG = AppConfig.load(DEFAULT_CONFIG)
TABLE = TierTable.load(CFG.depth_control.tiers_file)
EVIDENCE = TotEvidence(
    pays=True,
    accuracy_tot=0.61,
    accuracy_chain=0.52,
    tokens_tot=400,
    tokens_chain=420,
    n_problems=300,
    model="m",
    at="2026-11-28",
)
WORDS = [
    "prove",
    "that",
    "each",
    "option",
    "A",
    "B",
    "C",
    "D",
    "must",
    "hold",
    "given",
    "constraints",
    "plan",
    "schedule",
    "17",
    "+",
    "25",
    "why",
    "because",
]


def planner(evidence: dict[str, TotEvidence] | None = None) -> RequestPlanner:
    """The shipped registry with exactly this ToT evidence (none by default; the shipped file holds
    the served model's, which the router drops for any other model)."""
    domains = DomainRegistry.load(CFG.depth_control.domains_file)
    evidence = evidence or {}
    domains = domains.model_copy(
        update={
            "domains": {n: d.model_copy(update={"tot": evidence.get(n)}) for n, d in domains.domains.items()}
        }
    )
    return RequestPlanner(TABLE, ComplexityConfig.load(CFG.router.complexity_file), domains)


def test_a_tier_that_uses_tot_runs_a_chain_and_says_why_unless_asked_or_shown_to_pay():
    p = planner().plan(PlanRequest(user_text="hello", tier="high", domain="math"))
    assert (
        p.plan.strategy == "cot"
        and p.plan.tot is None
        and p.plan.max_rounds == TABLE.tiers["high"].max_rounds
    )
    assert p.tier_reason == "requested; chain: no evidence that Tree-of-Thought pays on math"
    asked = planner().plan(PlanRequest(user_text="hello", tier="high", domain="math", strategy="tot"))
    assert asked.plan.strategy == "tot" and asked.tier_reason.endswith("Tree-of-Thought: requested")
    budgets = planner().plan(PlanRequest(user_text="hello", tier="high", domain="math", tot={"branching": 2}))
    assert budgets.plan.strategy == "tot"  # naming ToT budgets asks for ToT
    shown = planner({"math": EVIDENCE}).plan(PlanRequest(user_text="hello", tier="high", domain="math"))
    assert (
        shown.plan.strategy == "tot"
        and "Tree-of-Thought beat a chain on math (0.61 vs 0.52" in shown.tier_reason
    )
    elsewhere = planner({"math": EVIDENCE}).plan(PlanRequest(user_text="hello", tier="high", domain="logic"))
    assert elsewhere.plan.strategy == "cot"  # evidence is per domain
    lost = planner({"math": EVIDENCE.model_copy(update={"pays": False})})
    assert "did not beat" in lost.plan(PlanRequest(user_text="hello", tier="high", domain="math")).tier_reason


def test_no_request_that_did_not_ask_for_tot_spends_more_than_its_tier_ceilings_chain():
    rng = random.Random(7)
    pl = planner()
    for _ in range(500):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        if rng.random() < 0.3:
            text += "\n" + "\n".join(f"{c}) option {i}" for i, c in enumerate("ABCD"))
        tier = rng.choice([None, None, *TIER_NAMES])
        strategy = rng.choice([None, None, "cot"])
        p = pl.plan(PlanRequest(user_text=text, tier=tier, strategy=strategy)).plan
        assert p.strategy == "cot" and p.tot is None, (text, tier, p)
        assert p.max_rounds <= TABLE.tiers[p.tier].max_rounds
