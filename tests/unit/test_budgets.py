"""Cluster-wide budgets (pure): degrade instead of refusing, node grants under a shared cap, leases."""

import json
import random

import pytest
from pydantic import ValidationError

from services.reasoning.budgets import Admission, BudgetConfig, Budgets


def cfg(**kw) -> BudgetConfig:
    return BudgetConfig(**({"max_deep_sessions": 2, "max_tot_nodes_in_flight": 3} | kw))


def deep(b, sid, now=0.0, key="k", min_rounds=4, max_rounds=6):
    return b.admit(sid, api_key=key, tier="high", min_rounds=min_rounds, max_rounds=max_rounds, now=now)


def test_config_is_strict():
    with pytest.raises(ValidationError):
        BudgetConfig(max_deep_sesions=3)  # a typo is an error, not a silent default
    with pytest.raises(ValidationError, match="below deep_rounds"):
        BudgetConfig(deep_rounds=3, degraded_max_rounds=3)  # a degraded session must be shallow
    assert BudgetConfig(tokens_per_minute_per_key=None).tokens_per_minute_per_key is None


def test_deep_sessions_over_the_cap_get_the_degraded_ceiling_and_a_reason():
    b = Budgets(cfg())
    assert deep(b, "a") == Admission(6, 4, False)
    deep(b, "b")
    c = deep(b, "c")
    assert c == Admission(2, 2, True, ("deep_sessions 2/2",))  # min_rounds lowered to fit the ceiling
    assert b.deep_in_flight == 2  # the degraded session is shallow: it holds no deep slot
    shallow = b.admit("d", api_key="k", tier="low", min_rounds=1, max_rounds=3, now=0)
    assert shallow == Admission(3, 1, False)  # below deep_rounds: the deep cap does not apply
    assert deep(b, "c", now=1) == c  # idempotent: a retried admit gets the first answer
    b.finish("a", now=2)
    assert deep(b, "e", now=2) == Admission(6, 4, False)
    s = b.stats(2)
    assert (s["degraded_admissions"], s["deep_sessions_in_flight"], s["sessions"]) == (1, 2, 4)


def test_min_rounds_never_exceeds_the_granted_ceiling():
    b = Budgets(cfg(max_deep_sessions=1, degraded_max_rounds=1))
    deep(b, "a")
    assert deep(b, "b", min_rounds=3) == Admission(1, 1, True, ("deep_sessions 1/1",))
    assert b.admit("c", api_key="k", tier="x", min_rounds=5, max_rounds=2, now=0) == Admission(2, 2, False)
    with pytest.raises(ValueError):
        b.admit("d", api_key="k", tier="x", min_rounds=0, max_rounds=0, now=0)


def test_tokens_per_minute_per_key_degrade_and_the_window_slides():
    b = Budgets(cfg(tokens_per_minute_per_key=100))
    b.add_tokens("k", 60, now=0.5)
    b.add_tokens("k", 40, now=30)
    b.add_tokens("k", 0, now=30)  # nothing to count
    assert b.tokens_last_minute("k", now=30) == 100
    a = deep(b, "a", now=30)
    assert a == Admission(2, 2, True, ("tokens_per_minute 100/100 for key k",))
    assert deep(b, "b", key="other", now=30) == Admission(6, 4, False)  # per key
    assert b.tokens_last_minute("k", now=59.9) == 100
    assert b.tokens_last_minute("k", now=60) == 40  # second 0's bucket left the window
    assert deep(b, "c", now=60) == Admission(6, 4, False)
    assert b.tokens_last_minute("k", now=90) == 0 and "k" not in b.windows  # idle keys leave


def test_both_pressures_are_reported():
    b = Budgets(cfg(max_deep_sessions=1, tokens_per_minute_per_key=10))
    deep(b, "a", key="other")
    b.add_tokens("k", 25, now=0)
    assert deep(b, "b").reasons == ("deep_sessions 1/1", "tokens_per_minute 25/10 for key k")


def test_beyond_max_sessions_admission_degrades_and_tracks_nothing():
    b = Budgets(cfg(max_sessions=2, max_deep_sessions=10))
    deep(b, "a")
    deep(b, "b")
    c = deep(b, "c")
    assert c == Admission(2, 2, True, ("sessions 2/2",))
    assert "c" not in b.sessions and b.grant_nodes("c", 1, now=0) == 0
    assert b.stats(0)["untracked_admissions"] == 1


def test_node_grants_share_one_cap_and_are_released():
    b = Budgets(cfg())
    for s in ("a", "b"):
        deep(b, s)
    assert b.grant_nodes("a", 2, now=0) == 2
    assert b.grant_nodes("b", 2, now=0) == 1  # partial: one left of 3
    assert b.grant_nodes("b", 1, now=0) == 0  # denied
    assert b.grant_nodes("nobody", 2, now=0) == 0 and b.grant_nodes("a", 0, now=0) == 0
    b.release_nodes("a", 5, now=1)  # over-release clamps to what the session holds
    assert b.nodes_in_flight == 1 and b.sessions["a"].nodes == 0
    assert b.grant_nodes("b", 3, now=1) == 2  # partial again
    b.finish("b", now=2)  # finishing frees a session's nodes
    b.finish("b", now=2)  # and is idempotent
    s = b.stats(2)
    assert (s["tot_nodes_in_flight"], s["partial_node_grants"], s["denied_node_grants"]) == (0, 2, 1)


def test_expired_leases_release_everything():
    b = Budgets(cfg(session_ttl_s=10))
    deep(b, "a", now=0)
    deep(b, "b", now=3)
    b.grant_nodes("a", 2, now=5)  # renews a's lease
    b.add_tokens("k", 7, now=0)
    assert b.expire(now=13) == []
    assert b.expire(now=13.5) == ["b"]
    assert b.deep_in_flight == 1 and b.nodes_in_flight == 2
    assert b.expire(now=15.5) == ["a"]
    assert b.nodes_in_flight == 0 and b.deep_in_flight == 0 and b.sessions == {}
    assert b.expire(now=61) == [] and b.windows == {}  # idle token windows go too
    assert b.grant_nodes("a", 1, now=16) == 0  # an expired session is unknown


def test_snapshot_restore_round_trip_drops_expired():
    b = Budgets(cfg(session_ttl_s=10, tokens_per_minute_per_key=1000))
    deep(b, "old", now=0)
    b.grant_nodes("old", 1, now=1)
    deep(b, "new", now=8)
    deep(b, "shallow", now=8)  # degraded: deep cap 2 reached
    b.grant_nodes("new", 5, now=8)  # partial: 2 of 5
    b.add_tokens("k", 50, now=8)
    snap = json.loads(json.dumps(b.snapshot()))  # what the checkpoint really stores
    r = Budgets.restore(b.cfg, snap, now=8)
    assert r.snapshot() == b.snapshot() and r.stats(8) == b.stats(8)
    later = Budgets.restore(b.cfg, snap, now=11.5)  # old's lease (renewed at 1) has lapsed
    assert sorted(later.sessions) == ["new", "shallow"]
    assert later.nodes_in_flight == 2 and later.deep_in_flight == 1
    assert later.tokens_last_minute("k", 11.5) == 50
    assert later.grant_nodes("new", 5, now=12) == 1  # nodes granted before the restart still count
    assert deep(later, "new", now=12) == Admission(6, 4, False)  # still idempotent after restore
    assert Budgets.restore(b.cfg, {"version": 999}, now=8).sessions == {}  # unknown format: start empty


def test_random_workload_never_exceeds_the_caps():
    rng = random.Random(3)
    b = Budgets(cfg(max_tot_nodes_in_flight=4, max_deep_sessions=3, session_ttl_s=30, max_sessions=12))
    for step in range(5000):
        now = step * 0.1
        sid = f"s{rng.randrange(16)}"
        op = rng.random()
        if op < 0.25:
            deep(b, sid, now=now, min_rounds=rng.randint(0, 4), max_rounds=rng.randint(1, 6))
        elif op < 0.55:
            b.grant_nodes(sid, rng.randint(1, 3), now=now)
        elif op < 0.8:
            held = b.sessions[sid].nodes if sid in b.sessions else 0
            b.release_nodes(sid, rng.randint(0, held + 1), now=now)
        elif op < 0.93:
            b.finish(sid, now=now)
        elif op < 0.98:
            b.expire(now)
        else:
            b = Budgets.restore(b.cfg, json.loads(json.dumps(b.snapshot())), now=now)  # actor restart
        assert 0 <= b.nodes_in_flight <= 4
        assert b.nodes_in_flight == sum(s.nodes for s in b.sessions.values())
        assert b.deep_in_flight == sum(s.deep for s in b.sessions.values()) <= 3
        assert len(b.sessions) <= 12
        assert all(s.admission.min_rounds <= s.admission.max_rounds for s in b.sessions.values())
    assert b.stats(now)["partial_node_grants"] + b.stats(now)["denied_node_grants"] > 0  # pressure reached


def test_freed_nodes_go_to_the_session_waiting_longest():
    b = Budgets(BudgetConfig(max_tot_nodes_in_flight=2))
    for sid in ("a", "b", "c"):
        b.admit(sid, api_key="k", tier="high", min_rounds=1, max_rounds=3, now=0)
    assert b.grant_nodes("a", 2, now=0) == 2
    assert b.grant_nodes("b", 2, now=0) == 0 and b.grant_nodes("c", 1, now=0) == 0  # b, then c wait
    b.release_nodes("a", 2, now=1)
    assert b.grant_nodes("a", 2, now=1) == 0  # a cannot jump the line it left
    assert b.grant_nodes("c", 1, now=1) == 0  # nor can c, behind b
    assert b.grant_nodes("b", 2, now=1) == 2
    b.release_nodes("b", 2, now=2)
    assert b.grant_nodes("c", 1, now=2) == 1 and b.grant_nodes("a", 1, now=2) == 1
    b.finish("b", now=3)
    assert b.stats(3)["sessions_waiting_for_nodes"] == 0
    r = Budgets.restore(b.cfg, b.snapshot(), now=3)
    assert r.snapshot() == b.snapshot()


def test_a_keys_own_limits_hold_for_the_whole_cluster_and_a_refusal_counts_nothing():
    b = Budgets(BudgetConfig())
    for i in range(3):
        assert b.limit_key("alice", 3, None, now=100.0 + i) is None
    r = b.limit_key("alice", 3, None, now=103.0)
    assert (r.kind, r.used, r.limit) == (
        "requests",
        3,
        3,
    ) and r.retry_after_s == 57  # the first leaves at 160
    assert "limit 3, used 3" in r.message() and b.limit_key("alice", 3, None, now=104.0).used == 3
    assert b.limit_key("bob", 3, None, now=104.0) is None  # per key
    assert b.limit_key("alice", 3, None, now=160.5) is None  # the first request left the window
    b.add_tokens("carol", 500, now=200.0)
    t = b.limit_key("carol", None, 500, now=201.0)
    assert (t.kind, t.used, t.retry_after_s) == ("tokens", 500, 59)
    assert b.limit_key("carol", None, 501, now=201.0) is None and b.stats(201.0)["key_refusals"] == 3
    back = Budgets.restore(BudgetConfig(), json.loads(json.dumps(b.snapshot())), now=161.0)
    assert back.limit_key("alice", 2, None, now=161.0).used == 2 and back.key_refusals == 4
