"""The router's side of the control plane's two actors: calls with timeouts, the local fallback, and
actor errors mapped to OpenAI-shaped HTTP errors. `DepthClient` (admission, verdicts under the
granted plan, ToT node leases, the finished session's report) degrades to local hard ceilings when
depth control is unreachable; `RecordsClient` (reviews, feedback, domains) fails with a clear 503
instead, never silently."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field

from services.control.state import (
    FeedbackExistsError,
    ReviewDecidedError,
    ReviewNotFoundError,
    StateError,
    UnknownRequestError,
)
from services.ingress.api import ApiError
from services.reasoning.budgets import NodeLease
from services.reasoning.signals import Signals
from services.reasoning.tiers import Action, DecidedBy, Reason, RoundPlan, Verdict, decide

log = logging.getLogger("ponder.control")

ANONYMOUS = "anonymous"
DURABLE_TIMEOUT_S = 15.0


def api_key_id(authorization: str | None) -> str:
    """A stable, non-reversible id for the caller's API key: raw keys are never stored or sent on."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return ANONYMOUS
    token = authorization[7:].strip()
    return "key-" + hashlib.sha256(token.encode()).hexdigest()[:16] if token else ANONYMOUS


@dataclass
class Control:
    """What depth control did for one request; reported in the response's `reasoning`."""

    reachable: bool = True
    degraded: bool = False
    reasons: list[str] = field(default_factory=list)
    local_decisions: int = 0  # rounds decided locally because the actor did not answer
    verdicts: str = "router"  # as granted at admission: the router's, or the actor's per round
    depth_value: dict | None = None  # the ceiling learned from later rounds' worth, as admitted

    def summary(self) -> dict:
        return {
            "depth_control": "ok" if self.reachable and not self.local_decisions else "unreachable",
            "local_ceilings": not self.reachable or self.local_decisions > 0,
            "degraded": self.degraded,
            "degraded_reasons": self.reasons,
            "depth_value": self.depth_value,
        }


GUARDS = (Reason.CEILING, Reason.MIN_ROUNDS)


class DepthClient:
    def __init__(
        self,
        actor,
        timeout_s: float,
        grant_wait_s: float = 10.0,
        on_decision=lambda seconds, decided_by: None,
        node_lease: int = 1,
    ) -> None:
        self.actor = actor
        self.timeout = timeout_s
        self.grant_wait_s = grant_wait_s
        self.on_decision = on_decision  # each verdict's latency, for metrics
        self.node_lease = node_lease
        # The last threshold admission granted per domain: a router that cannot reach depth control
        # keeps deciding with it (under the plan's hard ceilings).
        self.thresholds: dict[str, tuple[float | None, float]] = {}

    async def _call(self, call, timeout: float | None = None):
        return await asyncio.wait_for(call, timeout or self.timeout)

    async def admit(
        self, rid: str, key: str, plan: RoundPlan, control: Control, key_limits: dict | None = None
    ) -> dict | None:
        """The actor's admission (granted ceilings, domain threshold, verdict mode; or `refused` when
        the key is over its own limits cluster-wide), or None when unreachable."""
        domain = plan.domain or ""
        try:
            adm = await self._call(
                self.actor.admit.remote(
                    rid, key, plan.tier, plan.min_rounds, plan.max_rounds, domain, key_limits
                )
            )
        except Exception as exc:  # unreachable or restarting: the plan's own ceilings hold
            log.warning("depth control unavailable at admission (%s)", type(exc).__name__)
            control.reachable = False
            return None
        if "refused" in adm:
            return adm
        control.verdicts = adm.get("verdicts", "router")
        seen = self.thresholds.get(domain)
        version = float(adm.get("threshold_version", 0.0))
        if seen is None or version >= seen[1]:  # admissions may answer out of order
            self.thresholds[domain] = (adm.get("domain_threshold"), version)
        return adm

    async def depth_report(self) -> dict | None:
        """What later rounds were worth, per domain and tier (None: depth control unreachable)."""
        try:
            return await self._call(self.actor.depth_report.remote())
        except Exception as exc:
            log.warning("depth control unavailable for its depth report (%s)", type(exc).__name__)
            return None

    def last_threshold(self, domain: str | None) -> float | None:
        """The domain's threshold as the last admission granted it (None: none seen)."""
        seen = self.thresholds.get(domain or "")
        return None if seen is None else seen[0]

    def decider(self, control: Control):
        """A per-request DecideFn. Under a plan granted with router verdicts the round is decided
        here, with the actor's own pure policy, and no call; with actor verdicts the actor is asked
        for every round the guards do not settle. No admission (unreachable): None, and the loop's
        local hard ceilings decide."""

        async def decide_round(plan: RoundPlan, rounds_done: int, signals: Signals) -> Verdict | None:
            if not control.reachable:
                return None
            t0 = time.perf_counter()
            verdict = decide(plan, rounds_done, signals)
            if control.verdicts != "actor" or verdict.reason in GUARDS:
                self.on_decision(time.perf_counter() - t0, verdict.by.value)
                return verdict
            try:
                action, reason, detail = await self._call(
                    self.actor.decide.remote(
                        dataclasses.asdict(plan), rounds_done, dataclasses.asdict(signals)
                    )
                )
            except Exception as exc:  # local ceilings hold (RoundLoop.settle)
                log.warning("depth control unavailable (%s); deciding locally", type(exc).__name__)
                control.local_decisions += 1
                return None
            self.on_decision(time.perf_counter() - t0, DecidedBy.ACTOR.value)
            return Verdict(Action(action), Reason(reason), tuple(detail), by=DecidedBy.ACTOR)

        return decide_round

    def nodes(self, rid: str, control: Control):
        """Per-request ToT node grants, held as a lease (budgets.NodeLease): the actor is asked only
        when the search wants more nodes than it holds; released nodes wait for its next expansion
        and are all freed when the session finishes. An unreachable actor grants one child, so a
        search can end."""
        lease = NodeLease(self.node_lease)

        async def grant(wanted: int) -> int:
            # The cluster's ToT budget frees up as other searches finish: wait a little for it
            # (backing off) before the search has to stop or fall back to a chain.
            deadline = asyncio.get_running_loop().time() + self.grant_wait_s
            delay = 0.02
            while (ask := lease.ask(wanted)) > 0:
                try:
                    lease.add(int(await self._call(self.actor.grant_nodes.remote(rid, ask))))
                except Exception:
                    control.local_decisions += 1
                    return min(1, wanted)
                if lease.free > 0 or asyncio.get_running_loop().time() + delay > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            return lease.take(wanted)

        async def release(n: int) -> None:
            lease.put(n)  # kept for the next expansion; the actor frees them at finish

        return grant, release

    def finish(
        self,
        rid: str,
        key: str,
        completion_tokens: int,
        rounds: list[dict] | None = None,
        context: dict | None = None,
    ) -> None:
        """The session ended: its budgets are freed and its rounds reported (with their `context`:
        domain, tier, whether they were a chain's), in one call that nothing waits on (a lost report
        costs statistics, never a verdict)."""
        try:
            self.actor.finish.remote(rid, key, completion_tokens, rounds or [], context)
        except Exception as exc:
            log.warning("could not report session end (%s); its lease will expire", exc)

    def feedback(self, rid: str, correct: bool) -> None:
        """Feedback a request got, for the depth value (fire and forget, like `finish`)."""
        try:
            self.actor.feedback.remote(rid, correct)
        except Exception as exc:
            log.warning("could not pass feedback to depth control (%s)", exc)


class RecordsClient:
    """Reviews, feedback and domains: the records actor's durable state (services/control/records.py)."""

    def __init__(self, actor, timeout_s: float) -> None:
        self.actor = actor
        self.timeout = max(timeout_s, DURABLE_TIMEOUT_S)  # long enough to ride out an actor restart

    def record(self, rid: str, record: dict | None) -> None:
        """Keep a finished request for feedback (fire and forget; calls from one router stay in
        order, so its feedback never overtakes it)."""
        if record is None:
            return
        try:
            self.actor.record.remote(rid, record)
        except Exception as exc:
            log.warning("could not record request %s (%s); feedback on it will 404", rid, exc)

    async def create_review(
        self, review_id: str, rid: str, tier: str, domain: str, proposed: dict, body: dict
    ) -> dict:
        return await self._durable(
            lambda: self.actor.create_review.remote(review_id, rid, tier, domain, proposed, body)
        )

    async def list_reviews(self, status: str | None, limit: int) -> list[dict]:
        return await self._durable(lambda: self.actor.list_reviews.remote(status, limit))

    async def get_review(self, review_id: str) -> dict | None:
        return await self._durable(lambda: self.actor.get_review.remote(review_id))

    async def decide_review(
        self, review_id: str, approve: bool, reviewer: str | None, note: str | None
    ) -> dict:
        return await self._durable(
            lambda: self.actor.decide_review.remote(review_id, approve, reviewer, note)
        )

    async def feedback(self, request_id: str, correct: bool) -> dict:
        return await self._durable(lambda: self.actor.feedback.remote(request_id, correct))

    async def domains(self) -> dict:
        return await self._durable(lambda: self.actor.domains.remote())

    async def _durable(self, call):
        """The result of `call()`, a durable actor call: its errors become 4xx; an unreachable store
        is a clear 503."""
        try:  # Ray retries the call on a restarted actor (max_task_retries=-1)
            return await asyncio.wait_for(call(), self.timeout)
        except (UnknownRequestError, ReviewNotFoundError) as exc:
            raise ApiError(404, _user_message(exc), code="not_found") from exc
        except (FeedbackExistsError, ReviewDecidedError) as exc:
            raise ApiError(409, _user_message(exc), code="conflict") from exc
        except StateError as exc:
            raise ApiError(400, _user_message(exc)) from exc
        except Exception as exc:
            log.warning("control records unavailable (%s)", type(exc).__name__)
            raise ApiError(
                503,
                "Ponder's control state is unavailable right now (its actor is restarting); "
                "retry shortly. Nothing was lost.",
                type_="server_error",
                code="depth_control_unavailable",
            ) from exc


def _user_message(exc: StateError) -> str:
    """The state error's own message. Raised in the actor, it arrives as Ray's RayTaskError subclass
    of it, whose str() is the remote traceback (pids, addresses, actor ids): never shown to a client."""
    return str(getattr(exc, "cause", None) or exc)
