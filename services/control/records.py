"""The control records actor: Ponder's durable, user-facing control state — finished requests (for
feedback), feedback, live per-domain thresholds, human reviews — on SQLite.

Apart from the depth-control actor (services/control/depth_control.py) on purpose: a review or
feedback write, or a slow disk under SQLite, queues only calls here, never an admission or a
verdict. Both actors open the same file (WAL: readers never wait on a writer); depth control only
reads the thresholds that feedback here moves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.config import DepthControlConfig
from services.control.state import StateStore
from services.reasoning.domains import DomainRegistry, online_threshold

log = logging.getLogger("ponder.control_records")

STATE_FILE = "depth-control.sqlite"  # one file for the control plane (the name predates the split)
PRUNE_EVERY_S = 60.0  # requests past retention are deleted at most this often
MIN_CEILING_SAMPLES = 20


def state_path(cfg: DepthControlConfig) -> Path:
    assert cfg.state_dir is not None, "AppConfig.load resolves state_dir"
    return Path(cfg.state_dir) / STATE_FILE


def live_threshold(store: StateStore, registry: DomainRegistry, domain: str) -> float | None:
    """The domain's exit threshold: as feedback last moved it, else as configured."""
    live = store.thresholds().get(domain)
    if live is not None:
        return float(live["value"])
    d = registry.domains.get(domain)
    return None if d is None else d.threshold


def ray_gauges() -> dict[str, Any]:
    """The review queue's gauges, through Ray's metrics (exported as ray_ponder_*); none outside Ray."""
    import ray

    if not ray.is_initialized():
        return {}
    from ray.util import metrics

    return {
        "pending": metrics.Gauge("ponder_reviews_pending", "Answers held for human review."),
        "oldest": metrics.Gauge(
            "ponder_review_oldest_pending_created_seconds",
            "Unix time the oldest pending review was created (now when none is pending).",
        ),
    }


class ControlRecords:
    def __init__(
        self,
        cfg: dict,
        clock: Callable[[], float] = time.time,
        served_model: str | None = None,
        gauges: Callable[[], dict[str, Any]] = ray_gauges,
    ) -> None:
        self.cfg = DepthControlConfig.model_validate(cfg)
        self.clock = clock
        self.registry, _ = DomainRegistry.load(self.cfg.domains_file).for_model(served_model)
        self.store = StateStore(state_path(self.cfg))
        self._last_prune = 0.0
        self.gauges = gauges()
        self._export_reviews()

    def _export_reviews(self) -> None:
        """The queue as the gauges show it, set whenever it changes (a timestamp never goes stale:
        the alert computes the age, docs/observability.md)."""
        if not self.gauges:
            return
        count, oldest = self.store.pending_reviews()
        self.gauges["pending"].set(count)
        self.gauges["oldest"].set(self.clock() if oldest is None else oldest)

    def record(self, request_id: str, record: dict) -> None:
        """Remember a finished request, so feedback can name it (kept request_retention_s)."""
        now = self.clock()
        self.store.record_request(request_id, now=now, **record)
        if now - self._last_prune >= PRUNE_EVERY_S:  # retention: the file must not grow with traffic
            self.store.prune_requests(now - self.cfg.request_retention_s)
            self._last_prune = now

    # --- feedback and thresholds ------------------------------------------------------------------

    def feedback(self, request_id: str, correct: bool) -> dict:
        """Online feedback: store it, then re-check the request's domain threshold (raise-only)."""
        now = self.clock()
        row = self.store.add_feedback(request_id, correct, now)
        domain = row.get("domain") or self.registry.default_domain
        d = self.registry.domains.get(domain)
        current = live_threshold(self.store, self.registry, domain)
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
                    "threshold": live_threshold(self.store, self.registry, name),
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
        review = self.store.create_review(
            review_id,
            request_id=request_id,
            tier=tier,
            domain=domain,
            proposed=proposed,
            completion=completion,
            now=self.clock(),
        )
        self._export_reviews()
        return review

    def get_review(self, review_id: str) -> dict | None:
        return self.store.get_review(review_id)

    def list_reviews(self, status: str | None, limit: int) -> list[dict]:
        return self.store.list_reviews(status, limit)

    def decide_review(self, review_id: str, approve: bool, reviewer: str | None, note: str | None) -> dict:
        review = self.store.decide_review(
            review_id, approve=approve, reviewer=reviewer, note=note, now=self.clock()
        )
        self._export_reviews()
        return review

    def ping(self) -> str:
        return "ok"


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
