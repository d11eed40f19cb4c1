"""The depth-control actor: one named, restartable Ray actor that holds the central policy. It admits
each session against cluster-wide budgets and grants it a plan (ceilings, min rounds, the domain's
live threshold, and whether verdicts are the router's or asked of it per round); grants
Tree-of-Thought nodes in leases; takes each finished session's per-round reports for statistics.
By default routers decide rounds themselves under the granted plan with the same pure code, so a
chain request costs this actor two calls (admit, finish) whatever its number of rounds.

Shell only: the policies are pure (`tiers.decide`, `budgets.Budgets`, `domains`). Its budgets are
checkpointed to the control plane's SQLite file, so a restarted actor (Ray restarts it:
max_restarts=-1) resumes with the sessions, nodes in flight and counters it had. The durable,
user-facing records (finished requests, feedback, thresholds, reviews) belong to the records actor
(services/control/records.py): a slow write there never queues an admission or a verdict here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable

from services.config import DepthControlConfig
from services.control.records import state_path
from services.control.state import StateStore
from services.control.thresholds import LiveThresholds
from services.reasoning.budgets import Budgets
from services.reasoning.depth_value import DepthValue
from services.reasoning.domains import DomainRegistry
from services.reasoning.signals import Signals
from services.reasoning.tiers import RoundPlan, TierTable, decide

log = logging.getLogger("ponder.depth_control")


class DepthControl:
    def __init__(
        self,
        cfg: dict,
        incarnation: str = "",
        clock: Callable[[], float] = time.time,
        served_model: str | None = None,
    ) -> None:
        """`incarnation` names the Ray cluster's lifetime: a restart inside it (same value) resumes
        the sessions in flight; a new cluster drops them (their routers are gone) and keeps the rest.
        `served_model`: calibrations taken with another model are not applied (domains.for_model)."""
        self.cfg = DepthControlConfig.model_validate(cfg)
        self.clock = clock
        # Read at every (re)start, so a restarted actor enforces the same table.
        self.table = TierTable.load(self.cfg.tiers_file)
        self.registry, warnings = DomainRegistry.load(self.cfg.domains_file).for_model(served_model)
        for w in warnings:
            log.warning("%s", w)
        self.store = StateStore(state_path(self.cfg))
        self.thresholds = LiveThresholds(self.registry, self.store.thresholds, self.cfg.threshold_refresh_s)
        self.calls: Counter[str] = Counter()  # by method: what routers cost this actor
        self.reported: Counter[str] = Counter()  # rounds reported, by who decided them
        now = clock()
        meta = self.store.load_checkpoint("meta") or {}
        self.incarnation = incarnation
        snap = self.store.load_checkpoint("budgets") if meta.get("incarnation") == incarnation else None
        self.budgets = Budgets.restore(self.cfg.budgets, snap, now) if snap else Budgets(self.cfg.budgets)
        self.peak_nodes_in_flight = int(meta.get("peak_nodes_in_flight", 0)) if snap else 0
        self.decisions: Counter[str] = Counter(meta.get("decisions", {}))
        # Kept across cluster restarts too: what rounds were worth does not depend on the cluster.
        self.depth_value = DepthValue.restore(self.cfg.depth_value, self.store.load_checkpoint("depth_value"))
        self._depth_value_changed = False  # written with the next checkpoint only when it changed
        self.starts = int(meta.get("starts", 0)) + 1
        self._last_checkpoint = 0.0
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
        if self._depth_value_changed:
            self.store.save_checkpoint("depth_value", self.depth_value.snapshot(), now)
            self._depth_value_changed = False
        self._last_checkpoint = now

    # --- admission and decisions ------------------------------------------------------------------

    def admit(
        self,
        session_id: str,
        api_key: str,
        tier: str,
        min_rounds: int,
        max_rounds: int,
        domain: str,
        key_limits: dict | None = None,
    ) -> dict:
        """Admit a session: its granted ceilings (lowered under pressure) and its domain's live exit
        threshold. `key_limits` ({requests_per_minute, tokens_per_minute}, the caller's API key's own):
        held here for the whole cluster, so N routers do not allow N times a key's limit; over one,
        the answer is `{"refused": {...}}` (HTTP 429) and nothing is admitted."""
        self.calls["admit"] += 1
        now = self.clock()
        self.budgets.expire(now)
        if key_limits and session_id not in self.budgets.sessions:  # a retried admit is not counted twice
            refusal = self.budgets.limit_key(
                api_key, key_limits.get("requests_per_minute"), key_limits.get("tokens_per_minute"), now
            )
            if refusal is not None:
                self._checkpoint(now)
                return {"refused": dataclasses.asdict(refusal) | {"message": refusal.message()}}
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
        threshold = self.thresholds.get(domain, now)
        value = self._depth_value(session_id, domain, tier, adm.min_rounds, adm.max_rounds)
        return {
            "max_rounds": value["max_rounds"],
            "min_rounds": min(adm.min_rounds, value["max_rounds"]),
            "depth_value": value,
            "degraded": adm.degraded,
            "reasons": list(adm.reasons),
            "domain_threshold": threshold.value,
            "threshold_version": threshold.version,
            "verdicts": self.cfg.verdicts,
        }

    def _depth_value(self, session_id: str, domain: str, tier: str, floor: int, ceiling: int) -> dict:
        """The ceiling learned from what this domain's and tier's later rounds were worth; a share of
        sessions explores (runs to the granted ceiling) so the rounds above keep being measured."""
        if self.depth_value.explores(session_id):
            return {"max_rounds": ceiling, "reason": "exploring: runs to the ceiling", "explore": True}
        eff, why = self.depth_value.ceiling(domain, tier, floor, ceiling)
        if eff < ceiling:
            self.decisions["depth_value_lowered"] += 1
        return {"max_rounds": eff, "reason": why, "explore": False}

    def decide(self, plan: dict, rounds_done: int, signals: dict | None) -> tuple[str, str, list[str]]:
        """A round's verdict, for plans granted with `verdicts: actor` (counted when reported)."""
        self.calls["decide"] += 1
        p = RoundPlan(**plan)
        tier = self.table.tiers.get(p.tier)
        if tier is None:
            raise ValueError(f"unknown tier {p.tier!r}")
        p = dataclasses.replace(p, max_rounds=min(p.max_rounds, tier.max_rounds))
        verdict = decide(p, rounds_done, Signals(**signals) if signals else None)
        return verdict.action.value, verdict.reason.value, list(verdict.detail)

    def grant_nodes(self, session_id: str, wanted: int) -> int:
        """Up to `wanted` nodes, counted in flight until released or the session finishes (a
        router holds them as a lease for the search's later expansions: budgets.NodeLease)."""
        self.calls["grant_nodes"] += 1
        now = self.clock()
        granted = self.budgets.grant_nodes(session_id, wanted, now)
        in_flight = self.budgets.stats(now)["tot_nodes_in_flight"]
        self.peak_nodes_in_flight = max(self.peak_nodes_in_flight, in_flight)
        self._checkpoint(now, force=granted > 0)
        return granted

    def release_nodes(self, session_id: str, n: int) -> None:
        self.calls["release_nodes"] += 1
        now = self.clock()
        self.budgets.release_nodes(session_id, n, now)
        self._checkpoint(now, force=True)

    def finish(
        self,
        session_id: str,
        api_key: str,
        completion_tokens: int,
        rounds: list[dict] | None = None,
        context: dict | None = None,
    ) -> None:
        """A session ended: release its budgets (deep slot, nodes it held), count its tokens against
        its key, and take its rounds' report (services/ingress/chat.round_reports) for statistics;
        `context` ({domain, tier, chain}) says whether they were rounds of a chain, which teach
        the depth value. A report that does not parse costs its statistics, nothing else."""
        self.calls["finish"] += 1
        now = self.clock()
        self.budgets.finish(session_id, now)
        if completion_tokens:
            self.budgets.add_tokens(api_key, completion_tokens, now)
        for r in rounds or ():
            if isinstance(r, dict) and isinstance(r.get("decision"), str):
                self.decisions[r["decision"]] += 1
                self.reported[str(r.get("decided_by", ""))] += 1
                self.reported["answer_changed"] += bool(r.get("answer_changed"))
        ctx = context if isinstance(context, dict) else {}
        if ctx.get("chain") and rounds and all(isinstance(r, dict) for r in rounds):
            changed = [bool(r.get("answer_changed")) for r in rounds[1:]]
            self.depth_value.observe(
                str(ctx.get("domain", "")), str(ctx.get("tier", "")), changed, request_id=session_id
            )
            self._depth_value_changed = True
        self._checkpoint(now, force=True)

    def feedback(self, request_id: str, correct: bool) -> bool:
        """Feedback on a finished request (after the records actor took it): the rounds that changed
        its answer learn whether that ended right. False when there was nothing to learn."""
        self.calls["feedback"] += 1
        judged = self.depth_value.judge(str(request_id), bool(correct))
        if judged:
            self._depth_value_changed = True
            self._checkpoint(self.clock(), force=True)
        return judged

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
            "calls": dict(self.calls),
            "reported_rounds": dict(self.reported),
            "verdicts": self.cfg.verdicts,
            "depth_value": self.depth_report(),
        }

    def depth_report(self) -> dict:
        """Per domain and tier: each later round's requests seen and change rate, and the ceiling
        the configured one comes down to (GET /v1/domains, ponder status)."""
        out = {}
        for key, rounds in self.depth_value.summary().items():
            domain, _, tier = key.partition("|")
            t = self.table.tiers.get(tier)
            eff, why = self.depth_value.ceiling(domain, tier, t.min_rounds, t.max_rounds) if t else (None, "")
            out.setdefault(domain, {})[tier] = {"rounds": rounds, "effective_max_rounds": eff, "reason": why}
        return out

    def ping(self) -> str:
        return "ok"
