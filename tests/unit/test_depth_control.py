"""The control plane's actor classes without Ray: depth control's admission, decisions, node grants
and checkpointed state resumed by a new instance (what Ray's restart does); the records actor's
feedback, thresholds and reviews on the same SQLite file."""

import pytest

from services.config import DEFAULT_CONFIG, AppConfig
from services.control.client import Control, api_key_id
from services.control.depth_control import DepthControl
from services.control.records import ControlRecords
from services.control.state import FeedbackExistsError, ReviewDecidedError, UnknownRequestError
from services.reasoning.signals import Signals
from services.reasoning.tiers import make_plan


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# What a router records when a low-tier math request finishes (ControlRecords.record).
MATH_RECORD = {
    "domain": "math",
    "tier": "low",
    "strategy": "cot",
    "exit_reason": "confidence",
    "confidence": 0.9,
    "rounds": 1,
}


@pytest.fixture
def cfg(tmp_path):
    c = AppConfig.load(DEFAULT_CONFIG).depth_control
    c.state_dir = str(tmp_path)
    c.budgets.max_deep_sessions = 1
    c.budgets.max_tot_nodes_in_flight = 3
    return c.model_dump()


def test_a_restarted_actor_resumes_sessions_nodes_and_counters(cfg):
    clock = Clock()
    a = DepthControl(cfg, "cluster-1", clock)
    first = a.admit("s1", "k", "medium", 3, 4, "general")
    assert first["degraded"] is False and first["max_rounds"] == 4
    assert a.grant_nodes("s1", 2) == 2
    a.admit("s0", "k", "low", 1, 2, "general")  # a shallow session, finished with its report
    a.finish("s0", "k", 3, [{"decision": "min_rounds", "decided_by": "router"}])
    b = DepthControl(cfg, "cluster-1", clock)  # Ray re-runs __init__ with the same arguments
    assert b.starts == 2
    assert b.stats()["decisions"] == {"min_rounds": 1}
    assert b.budgets.stats(clock())["tot_nodes_in_flight"] == 2
    assert b.grant_nodes("s1", 2) == 1  # cap 3, 2 still in flight from before the restart
    second = b.admit("s2", "k", "medium", 3, 4, "general")  # s1 still holds the one deep slot
    assert second["degraded"] is True and second["max_rounds"] == 2
    c = DepthControl(cfg, "cluster-2", clock)  # a new cluster: its sessions' routers are gone
    assert c.budgets.stats(clock())["tot_nodes_in_flight"] == 0
    assert c.stats()["decisions"] == {"min_rounds": 1, "degraded": 1}  # survive a cluster restart


def test_decide_narrows_to_the_tier_ceiling_and_never_skips_min_rounds(cfg):
    a = DepthControl(cfg, "c", Clock())
    plan = make_plan(a.table, "medium").__dict__ | {"max_rounds": 9}  # a router may not widen
    sure = Signals(1.0, None, None, None, 10, stable_rounds=5).__dict__
    assert a.decide(plan, 2, sure)[:2] == ("continue", "min_rounds")
    assert a.decide(plan, 3, sure)[:2] == ("exit", "confidence")
    assert a.decide(plan, 4, None)[:2] == ("exit", "ceiling")


def test_feedback_needs_a_finished_request_and_is_once_only(cfg):
    a, r = DepthControl(cfg, "c", Clock()), ControlRecords(cfg, Clock())
    with pytest.raises(UnknownRequestError):
        r.feedback("chatcmpl-x", True)
    a.admit("chatcmpl-x", "k", "low", 1, 2, "math")
    a.finish("chatcmpl-x", "k", 12)
    r.record("chatcmpl-x", {**MATH_RECORD, "completion_tokens": 12})
    out = r.feedback("chatcmpl-x", True)
    assert out["domain"] == "math" and out["threshold"] is not None
    with pytest.raises(FeedbackExistsError):
        r.feedback("chatcmpl-x", False)
    assert a.budgets.stats(a.clock())["sessions"] == 0


def test_finish_counts_the_sessions_tokens_against_its_key(cfg):
    clock = Clock()
    a = DepthControl(cfg, "c", clock)
    a.admit("s", "k", "low", 1, 2, "math")
    a.finish("s", "k", 12)
    a.finish("s2", "k", 0)  # a failed request: nothing counted
    assert a.budgets.stats(clock())["sessions"] == 0
    assert a.budgets.tokens_last_minute("k", clock()) == 12


def test_feedback_moves_the_threshold_depth_control_admits_with(cfg):
    """Two actors, one file: a threshold feedback raised is what admissions carry within
    threshold_refresh_s (a versioned pull: no SQLite read per admission)."""
    clock = Clock()
    a, r = DepthControl(cfg, "c", clock), ControlRecords(cfg, clock)
    first = a.admit("s0", "k", "low", 1, 2, "general")
    before = first["domain_threshold"]
    assert first["threshold_version"] == 0.0 and first["verdicts"] == "router"
    r.store.set_threshold("general", before + 0.05, source="feedback", now=clock.t)
    clock.t += a.cfg.threshold_refresh_s / 2
    assert a.admit("s1", "k", "low", 1, 2, "general")["domain_threshold"] == before  # not yet read
    clock.t += a.cfg.threshold_refresh_s / 2
    later = a.admit("s2", "k", "low", 1, 2, "general")
    assert later["domain_threshold"] == before + 0.05 and later["threshold_version"] == 1000.0


def test_finish_takes_the_rounds_report_and_the_actor_counts_its_calls(cfg):
    a = DepthControl(cfg, "c", Clock())
    a.admit("s", "k", "low", 1, 2, "math")
    report = [
        {"decision": "below_threshold", "decided_by": "router", "answer_changed": False},
        {"decision": 3},  # does not parse: its statistics are lost, nothing else
        "garbage",
        {"decision": "confidence", "decided_by": "router", "answer_changed": True},
    ]
    a.finish("s", "k", 7, report)
    stats = a.stats()
    assert stats["decisions"] == {"below_threshold": 1, "confidence": 1}
    assert stats["reported_rounds"] == {"router": 2, "answer_changed": 1}
    assert stats["calls"] == {"admit": 1, "finish": 1}
    assert a.budgets.stats(a.clock())["sessions"] == 0


def test_reviews_survive_a_restart_and_decide_once(cfg):
    clock = Clock()
    a = ControlRecords(cfg, clock)
    a.create_review("review-1", "chatcmpl-1", "critical", "medical", {"content": "x"}, {"id": "chatcmpl-1"})
    b = ControlRecords(cfg, clock)
    assert [r["id"] for r in b.list_reviews("pending", 10)] == ["review-1"]
    assert b.decide_review("review-1", True, "dr", None)["status"] == "approved"
    with pytest.raises(ReviewDecidedError):
        b.decide_review("review-1", False, None, None)


class Gauge:
    def __init__(self) -> None:
        self.value = None

    def set(self, v) -> None:
        self.value = v


def test_the_review_queue_is_exported_as_it_changes_and_survives_a_restart(cfg):
    clock = Clock()
    g = {"pending": Gauge(), "oldest": Gauge()}
    a = ControlRecords(cfg, clock, gauges=lambda: g)
    assert (g["pending"].value, g["oldest"].value) == (0, clock())  # none pending: the age is 0
    a.create_review("review-1", "chatcmpl-1", "critical", "medical", {}, {"id": "chatcmpl-1"})
    created = clock()
    clock.t += 100
    a.create_review("review-2", "chatcmpl-2", "critical", "legal", {}, {"id": "chatcmpl-2"})
    assert (g["pending"].value, g["oldest"].value) == (2, created)  # the oldest one's creation time
    clock.t += 50
    h = {"pending": Gauge(), "oldest": Gauge()}
    b = ControlRecords(cfg, clock, gauges=lambda: h)  # a restarted actor exports the queue at once
    assert (h["pending"].value, h["oldest"].value) == (2, created)
    b.decide_review("review-1", True, "dr", None)
    assert (h["pending"].value, h["oldest"].value) == (1, created + 100)
    b.decide_review("review-2", False, "dr", None)
    assert (h["pending"].value, h["oldest"].value) == (0, clock())


def test_api_key_ids_are_hashed_and_control_reports_local_ceilings():
    assert api_key_id(None) == api_key_id("Basic x") == "anonymous"
    k = api_key_id("Bearer sk-secret")
    assert k.startswith("key-") and "sk-secret" not in k and k == api_key_id("bearer sk-secret")
    c = Control()
    assert c.summary()["depth_control"] == "ok" and not c.summary()["local_ceilings"]
    c.local_decisions = 1
    assert c.summary() | {"degraded_reasons": []} == {
        "depth_control": "unreachable",
        "local_ceilings": True,
        "degraded": False,
        "degraded_reasons": [],
        "depth_value": None,
    }


def test_uncalibrated_domain_threshold_rises_when_confident_exits_trail_ceiling_runs(cfg):
    a = ControlRecords(cfg, Clock())
    start = DepthControl(cfg, "c", Clock()).thresholds.get("general", 0.0).value

    def finished(i, reason, correct):
        rid = f"chatcmpl-{reason}-{i}"
        a.record(
            rid,
            {
                "domain": "general",
                "tier": "medium",
                "strategy": "cot",
                "exit_reason": reason,
                "confidence": 0.9,
                "rounds": 3,
                "completion_tokens": 5,
            },
        )
        return a.feedback(rid, correct)

    for i in range(20):
        out = finished(i, "ceiling", True)  # running to the ceiling was always right
    assert out["threshold"] == start  # no confidence exits yet: nothing to judge
    for i in range(20):
        out = finished(i, "confidence", i % 2 == 0)  # exiting early was right half the time
    assert out["threshold"] == round(start + 0.02, 6)
    assert a.domains()["domains"]["general"]["threshold_source"] == "feedback"
    stats = a.domains()["domains"]["general"]["feedback"]["by_exit_reason"]
    assert stats["ceiling"]["accuracy"] == 1.0 and stats["confidence"]["accuracy"] == 0.5


def test_finished_requests_past_retention_are_forgotten_but_their_feedback_stays(cfg):
    clock = Clock()
    a = ControlRecords({**cfg, "request_retention_s": 3600.0}, clock)
    record = {**MATH_RECORD, "completion_tokens": 5}
    for rid in ("old-1", "old-2"):
        a.record(rid, record)
    a.feedback("old-1", True)
    clock.t += 3601.0  # past retention: the next finished request prunes the old ones
    a.record("new", record)
    assert a.store.get_request("old-2") is None and a.store.get_request("new") is not None
    with pytest.raises(UnknownRequestError):
        a.feedback("old-2", True)
    assert len(a.store.domain_feedback("math")) == 1  # feedback outlives its request


def test_the_learned_ceiling_comes_down_survives_a_restart_and_explorers_keep_the_ceiling(cfg):
    cfg["depth_value"] = {"min_samples": 20, "window": 50, "max_change_rate": 0.05, "explore": 0.1}
    cfg["budgets"]["max_deep_sessions"] = 1000  # no pressure: only what rounds were worth lowers ceilings
    clock = Clock()
    a = DepthControl(cfg, "cluster-1", clock)
    unchanged = [{"decision": "x", "answer_changed": False}] * 4  # four rounds, one answer throughout
    chain = {"domain": "math", "tier": "medium", "chain": True}
    for i in range(20):
        a.admit(f"s{i}", "k", "medium", 3, 4, "math")
        a.finish(f"s{i}", "k", 10, unchanged, chain)
        a.finish(f"t{i}", "k", 10, unchanged, {**chain, "chain": False})  # ToT or thinking: not rounds
    b = DepthControl(cfg, "cluster-2", clock)  # the statistics survive even a new cluster
    grants = [b.admit(f"n{i}", "k", "medium", 3, 4, "math") for i in range(200)]
    explored = [g for g in grants if g["depth_value"]["explore"]]
    assert 5 <= len(explored) <= 40 and all(g["max_rounds"] == 4 for g in explored)
    lowered = [g for g in grants if not g["depth_value"]["explore"]]
    assert all(g["max_rounds"] == 3 and g["min_rounds"] == 3 for g in lowered)  # the floor: min_rounds
    assert lowered[0]["depth_value"]["reason"].startswith("round 4 changed 0.0% of answers over 20")
    assert b.admit("x", "k", "medium", 3, 4, "code")["depth_value"]["max_rounds"] == 4  # per domain
    report = b.depth_report()["math"]["medium"]
    assert report["effective_max_rounds"] == 3 and report["rounds"]["round_4"]["requests"] == 20
    assert b.stats()["depth_value"] == b.depth_report()


def test_a_keys_limits_are_held_at_admission_for_every_router_and_retries_count_once(cfg):
    cfg["budgets"]["max_deep_sessions"] = 100
    clock = Clock()
    a = DepthControl(cfg, "cluster-1", clock)
    limits = {"requests_per_minute": 2, "tokens_per_minute": None}
    assert "refused" not in a.admit("s1", "alice", "low", 1, 2, "general", limits)
    assert "refused" not in a.admit("s1", "alice", "low", 1, 2, "general", limits)  # a retried admit
    assert "refused" not in a.admit("s2", "alice", "low", 1, 2, "general", limits)
    refused = a.admit("s3", "alice", "low", 1, 2, "general", limits)["refused"]
    assert refused["kind"] == "requests" and refused["limit"] == 2 and 1 <= refused["retry_after_s"] <= 60
    assert "all routers" in refused["message"] and "s3" not in a.budgets.sessions  # nothing admitted
    assert "refused" not in a.admit("s4", "bob", "low", 1, 2, "general", limits)
    a.finish("s1", "alice", 700)  # tokens count once the session reports them
    tokens = {"requests_per_minute": None, "tokens_per_minute": 700}
    assert a.admit("s5", "alice", "low", 1, 2, "general", tokens)["refused"]["kind"] == "tokens"
    assert "refused" not in a.admit("s6", "alice", "low", 1, 2, "general")  # no limits: nothing held


def test_feedback_teaches_the_depth_value_whether_changes_ended_right_and_survives_a_restart(cfg):
    cfg["depth_value"] = {"min_samples": 20, "window": 50, "max_change_rate": 0.05, "min_judged": 10}
    cfg["budgets"]["max_deep_sessions"] = 1000
    clock = Clock()
    a = DepthControl(cfg, "cluster-1", clock)
    chain = {"domain": "math", "tier": "medium", "chain": True}
    last_changes = [{"decision": "x", "answer_changed": i == 3} for i in range(4)]  # round 4 changes it
    for i in range(20):
        a.admit(f"s{i}", "k", "medium", 3, 4, "math")
        a.finish(f"s{i}", "k", 10, last_changes, chain)
    assert a.admit("n", "k", "medium", 3, 4, "math")["max_rounds"] == 4  # round 4 changes every answer
    assert all(a.feedback(f"s{i}", False) for i in range(20))  # ... and every change ended wrong
    assert not a.feedback("s0", False) and not a.feedback("unknown", True)
    b = DepthControl(cfg, "cluster-1", clock)  # restarted: the judged changes were checkpointed
    lowered = [g for g in (b.admit(f"m{i}", "k", "medium", 3, 4, "math") for i in range(50))]
    assert any(g["max_rounds"] == 3 for g in lowered)
    row = b.depth_report()["math"]["medium"]["rounds"]["round_4"]
    assert (row["changed"], row["changes_judged"], row["changes_right"]) == (20, 20, 0)
    assert a.stats()["calls"]["feedback"] == 22
