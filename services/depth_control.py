"""The depth-control actor: one named, restartable Ray actor that answers, per round, continue or
exit and why. The policy is the pure `services.reasoning.tiers.decide`; this shell holds the tier
table, re-checks each plan against it and counts decisions."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

from services.config import DepthControlConfig
from services.reasoning.tiers import RoundPlan, TierTable, decide

log = logging.getLogger("ponder.depth_control")


class DepthControl:
    def __init__(self, tiers_file: str) -> None:
        # Read at every (re)start, so a restarted actor enforces the same table.
        self.table = TierTable.load(tiers_file)
        self.decisions: Counter[str] = Counter()
        log.info("depth control up with tiers %s", ",".join(self.table.tiers))

    def decide(self, plan: dict, rounds_done: int, confidence: float | None) -> tuple[str, str]:
        p = RoundPlan(**plan)
        tier = self.table.tiers.get(p.tier)
        if tier is None:
            raise ValueError(f"unknown tier {p.tier!r}")
        # A router may narrow its tier's ceiling, never widen it.
        p = dataclasses.replace(p, max_rounds=min(p.max_rounds, tier.max_rounds))
        verdict = decide(p, rounds_done, confidence)
        self.decisions[verdict.reason.value] += 1
        return verdict.action.value, verdict.reason.value

    def tier_table(self) -> dict:
        return self.table.model_dump()

    def stats(self) -> dict:
        return {"decisions": dict(self.decisions)}

    def ping(self) -> str:
        return "ok"


def get_or_create(cfg: DepthControlConfig):
    """The cluster's depth-control actor, created on first use by whichever router comes first."""
    import ray

    actor_cls = ray.remote(DepthControl)
    return actor_cls.options(
        name=cfg.name,
        namespace=cfg.namespace,
        get_if_exists=True,
        lifetime="detached",  # outlives any one router replica
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
    ).remote(cfg.tiers_file)
