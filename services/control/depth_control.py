"""The depth-control actor: one named, restartable Ray actor that decides, per round, continue or exit
and why; admits sessions against cluster-wide budgets; grants Tree-of-Thought nodes; and owns Ponder's
durable control state (budget checkpoint, per-domain thresholds, feedback, human reviews).

Shell only: the policies are pure (`tiers.decide`, `budgets.Budgets`, `domains`), the state lives in
`services.control.state.StateStore` (SQLite). Every state change is checkpointed, so a restarted actor (Ray
restarts it: max_restarts=-1) resumes with the sessions, nodes in flight and counters it had.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from services.config import DepthControlConfig
from services.control.state import StateStore
from services.reasoning.budgets import Budgets
from services.reasoning.domains import DomainRegistry, online_threshold
from services.reasoning.signals import Signals
from services.reasoning.tiers import RoundPlan, TierTable, decide

log = logging.getLogger("ponder.depth_control")

STATE_FILE = "depth-control.sqlite"


PRUNE_EVERY_S = 60.0  # requests past retention are deleted at most this often


class DepthControl:
    def __init__(self, cfg: dict, incarnation: str = "", clock: Callable[[], float] = time.time) -> None:
        """`incarnation` names the Ray cluster's lifetime: a restart inside it (same value) resumes
        the sessions in flight; a new cluster drops them (their routers are gone) and keeps the rest."""
        self.cfg = DepthControlConfig.model_validate(cfg)
        self.clock = clock
        # Read at every (re)start, so a restarted actor enforces the same table.
        self.table = TierTable.load(self.cfg.tiers_file)
        self.registry = DomainRegistry.load(self.cfg.domains_file)
        assert self.cfg.state_dir is not None, "AppConfig.load resolves state_dir"
        self.store = StateStore(Path(self.cfg.state_dir) / STATE_FILE)
        now = clock()
        meta = self.store.load_checkpoint("meta") or {}
        self.incarnation = incarnation
        snap = self.store.load_checkpoint("budgets") if meta.get("incarnation") == incarnation else None
        self.budgets = Budgets.restore(self.cfg.budgets, snap, now) if snap else Budgets(self.cfg.budgets)
        self.peak_nodes_in_flight = int(meta.get("peak_nodes_in_flight", 0)) if snap else 0
        self.decisions: Counter[str] = Counter(meta.get("decisions", {}))
        self.starts = int(meta.get("starts", 0)) + 1
        self._last_checkpoint = 0.0
        self._last_prune = 0.0
        self._checkpoint(now, force=True)
        log.info(
            "depth control up (start %d) with tiers %s; %d sessions resumed",
            self.starts,
            ",".join(self.table.tiers),
            len(snap.get("sessions", {})) if snap else 0,
        )

    # --- state ------------------------------------------------------------------------------------

    def _checkpoint(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_checkpoint < self.cfg.checkpoint_interval_s:
            return
        self.store.save_checkpoint("budgets", self.budgets.snapshot(), now)
        meta = {
            "decisions": dict(self.decisions),
            "starts": self.starts,
            "incarnation": self.incarnation,
            "peak_nodes_in_flight": self.peak_nodes_in_flight,
        }
        self.store.save_checkpoint("meta", meta, now)
        self._last_checkpoint = now

    def _threshold(self, domain: str) -> float | None:
        live = self.store.thresholds().get(domain)
        if live is not None:
            return float(live["value"])
        d = self.registry.domains.get(domain)
        return None if d is None else d.threshold

    # --- admission and decisions ------------------------------------------------------------------

    def admit(
        self, session_id: str, api_key: str, tier: str, min_rounds: int, max_rounds: int, domain: str
    ) -> dict:
        """Admit a session: its granted ceilings (lowered under pressure, never refused) and its
        domain's live exit threshold."""
        now = self.clock()
        self.budgets.expire(now)
        # A router may narrow its tier's ceiling, never widen it.
        t = self.table.tiers.get(tier)
        if t is None:
            raise ValueError(f"unknown tier {tier!r}")
        adm = self.budgets.admit(
            session_id,
            api_key=api_key,
            tier=tier,
            min_rounds=min(min_rounds, t.max_rounds),
            max_rounds=min(max_rounds, t.max_rounds),
            now=now,
        )
        if adm.degraded:
            self.decisions["degraded"] += 1
        self._checkpoint(now)
        return {
            "max_rounds": adm.max_rounds,
            "min_rounds": adm.min_rounds,
            "degraded": adm.degraded,
            "reasons": list(adm.reasons),
            "domain_threshold": self._threshold(domain),
        }

    def decide(self, plan: dict, rounds_done: int, signals: dict | None) -> tuple[str, str, list[str]]:
        p = RoundPlan(**plan)
        tier = self.table.tiers.get(p.tier)
        if tier is None:
            raise ValueError(f"unknown tier {p.tier!r}")
        p = dataclasses.replace(p, max_rounds=min(p.max_rounds, tier.max_rounds))
        verdict = decide(p, rounds_done, Signals(**signals) if signals else None)
        self.decisions[verdict.reason.value] += 1
        self._checkpoint(self.clock())
        return verdict.action.value, verdict.reason.value, list(verdict.detail)

    def grant_nodes(self, session_id: str, wanted: int) -> int:
        now = self.clock()
        granted = self.budgets.grant_nodes(session_id, wanted, now)
        in_flight = self.budgets.stats(now)["tot_nodes_in_flight"]
        self.peak_nodes_in_flight = max(self.peak_nodes_in_flight, in_flight)
        self._checkpoint(now, force=granted > 0)
        return granted

    def release_nodes(self, session_id: str, n: int) -> None:
        now = self.clock()
        self.budgets.release_nodes(session_id, n, now)
        self._checkpoint(now, force=True)

    def finish(self, session_id: str, api_key: str, record: dict | None) -> None:
        """A session ended: release its budgets, count its tokens, keep its record for feedback."""
        now = self.clock()
        self.budgets.finish(session_id, now)
        if record is not None:
            self.budgets.add_tokens(api_key, int(record.get("completion_tokens", 0)), now)
            self.store.record_request(session_id, now=now, **record)
        if now - self._last_prune >= PRUNE_EVERY_S:  # retention: the file must not grow with traffic
            self.store.prune_requests(now - self.cfg.request_retention_s)
            self._last_prune = now
        self._checkpoint(now, force=True)

    # --- feedback and thresholds ------------------------------------------------------------------

    def feedback(self, request_id: str, correct: bool) -> dict:
        """Online feedback: store it, then re-check the request's domain threshold (raise-only)."""
        now = self.clock()
        row = self.store.add_feedback(request_id, correct, now)
        domain = row.get("domain") or self.registry.default_domain
        d = self.registry.domains.get(domain)
        current = self._threshold(domain)
        result = {"request_id": request_id, "correct": correct, "domain": domain, "threshold": current}
        if d is None or current is None:
            return result
        rows = self.store.domain_feedback(domain)
        target = _target_accuracy(d.calibration.accuracy_ceiling if d.calibration else None, rows)
        result["stats"] = feedback_stats(rows)
        if target is None:
            return result
        new = online_threshold(
            current, [(r["confidence"], r["exit_reason"], r["correct"]) for r in rows], target_accuracy=target
        )
        if new != current:
            self.store.set_threshold(domain, new, source="feedback", now=now)
            log.info("domain %s threshold %.3f -> %.3f from feedback", domain, current, new)
        result["threshold"] = new
        return result

    def domains(self) -> dict:
        live = self.store.thresholds()
        return {
            "default_domain": self.registry.default_domain,
            "domains": {
                name: {
                    "description": d.description,
                    "threshold": self._threshold(name),
                    "threshold_source": live[name]["source"] if name in live else "config",
                    "calibration": d.calibration.model_dump() if d.calibration else None,
                    "feedback": feedback_stats(self.store.domain_feedback(name)),
                }
                for name, d in self.registry.domains.items()
            },
        }

    # --- human review -----------------------------------------------------------------------------

    def create_review(
        self, review_id: str, request_id: str, tier: str, domain: str, proposed: dict, completion: dict
    ) -> dict:
        return self.store.create_review(
            review_id,
            request_id=request_id,
            tier=tier,
            domain=domain,
            proposed=proposed,
            completion=completion,
            now=self.clock(),
        )

    def get_review(self, review_id: str) -> dict | None:
        return self.store.get_review(review_id)

    def list_reviews(self, status: str | None, limit: int) -> list[dict]:
        return self.store.list_reviews(status, limit)

    def decide_review(self, review_id: str, approve: bool, reviewer: str | None, note: str | None) -> dict:
        return self.store.decide_review(
            review_id, approve=approve, reviewer=reviewer, note=note, now=self.clock()
        )

    # --- introspection ----------------------------------------------------------------------------

    def tier_table(self) -> dict:
        return self.table.model_dump()

    def stats(self) -> dict:
        now = self.clock()
        return {
            "decisions": dict(self.decisions),
            "starts": self.starts,
            "incarnation": self.incarnation,
            "budgets": self.budgets.stats(now),
            "peak_tot_nodes_in_flight": self.peak_nodes_in_flight,
        }

    def ping(self) -> str:
        return "ok"


MIN_CEILING_SAMPLES = 20


def _target_accuracy(calibrated: float | None, rows: list[dict]) -> float | None:
    """What confidence exits must match: the calibrated ceiling accuracy, else (uncalibrated) the
    accuracy of the domain's requests that ran to their ceiling, once there are enough of them."""
    if calibrated is not None:
        return calibrated
    ceiling = [r["correct"] for r in rows if r["exit_reason"] == "ceiling"]
    return sum(ceiling) / len(ceiling) if len(ceiling) >= MIN_CEILING_SAMPLES else None


def feedback_stats(rows: list[dict]) -> dict:
    """Feedback counts and accuracy per exit reason (recent rows), for GET /v1/domains."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["exit_reason"], {"n": 0, "correct": 0})
        s["n"] += 1
        s["correct"] += int(r["correct"])
    for s in out.values():
        s["accuracy"] = round(s["correct"] / s["n"], 4)
    return {"n": len(rows), "by_exit_reason": out}


HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource


def get_or_create(cfg: DepthControlConfig):
    """The cluster's depth-control actor, created on first use by whichever router comes first."""
    import ray

    # Only the creating call's arguments count, and Ray reuses them on every restart; node ids are
    # random per node start, so this names the cluster's lifetime.
    incarnation = ray.get_runtime_context().get_node_id()[:16]

    actor_cls = ray.remote(DepthControl)
    return actor_cls.options(
        name=cfg.name,
        namespace=cfg.namespace,
        get_if_exists=True,
        lifetime="detached",  # outlives any one router replica
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=1,  # one call at a time: the budgets and the SQLite file need no locks
        num_cpus=0,
        # On the head: its state_dir is the volume there (deploy/helm: the head pod's state PVC), and a
        # restart must find the same SQLite file, which a worker node's disk would not have.
        resources={HEAD_NODE_RESOURCE: 0.001},
    ).remote(cfg.model_dump(), incarnation)
