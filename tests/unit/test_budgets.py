"""Cluster-wide budgets (pure): degrade instead of refusing, node grants under a shared cap, leases."""

import random

from services.reasoning.budgets import Admission, BudgetConfig, Budgets


def cfg(**kw) -> BudgetConfig:
    return BudgetConfig(**({"max_deep_sessions": 2, "max_tot_nodes_in_flight": 3} | kw))


def test_deep_sessions_over_the_cap_get_a_lower_ceiling_and_a_reason():
    b = Budgets(cfg())
    assert b.admit("a", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=0) == Admission(6, 4, False)
    b.admit("b", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=0)
    c = b.admit("c", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=0)
    assert (c.max_rounds, c.min_rounds, c.degraded) == (2, 2, True)  # min_rounds lowered to fit
    assert c.reasons == ("deep_sessions 2/2",)
    shallow = b.admit("d", api_key="k", tier="low", min_rounds=1, max_rounds=2, now=0)
    assert not shallow.degraded  # shallow sessions are not limited by the deep cap
    assert b.admit("c", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=1) == c  # idempotent
    b.finish("a", now=2)
    assert not b.admit("e", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=2).degraded
    assert b.stats(2)["degraded_admissions"] == 1


def test_tokens_per_minute_per_key_degrade_and_the_window_slides():
    b = Budgets(cfg(tokens_per_minute_per_key=100))
    b.add_tokens("k", 60, now=0)
    b.add_tokens("k", 40, now=30)
    assert b.tokens_last_minute("k", now=30) == 100
    adm = b.admit("a", api_key="k", tier="medium", min_rounds=3, max_rounds=4, now=30)
    assert adm.degraded and adm.reasons == ("tokens_per_minute 100/100 for key k",)
    assert not b.admit("b", api_key="other", tier="medium", min_rounds=3, max_rounds=4, now=30).degraded
    assert b.tokens_last_minute("k", now=61) == 40  # the first bucket left the window
    assert not b.admit("c", api_key="k", tier="low", min_rounds=1, max_rounds=2, now=61).degraded


def test_node_grants_share_one_cap_and_are_released():
    b = Budgets(cfg())
    for s in ("a", "b"):
        b.admit(s, api_key="k", tier="high", min_rounds=1, max_rounds=3, now=0)
    assert b.grant_nodes("a", 2, now=0) == 2
    assert b.grant_nodes("b", 2, now=0) == 1  # partial: one left of 3
    assert b.grant_nodes("b", 1, now=0) == 0  # b now waits in line
    assert b.grant_nodes("nobody", 2, now=0) == 0
    b.release_nodes("a", 2, now=1)
    assert b.grant_nodes("a", 2, now=1) == 0  # freed nodes go to the waiting b first, not back to a
    assert b.grant_nodes("b", 3, now=1) == 2
    assert b.grant_nodes("a", 1, now=1) == 0  # full again; a is in line now
    b.finish("b", now=2)  # finishing frees a session's nodes
    assert b.nodes_in_flight == 0 and b.grant_nodes("a", 1, now=2) == 1
    assert b.stats(2)["partial_node_grants"] == 5 and b.stats(2)["sessions_waiting_for_nodes"] == 0


def test_expired_leases_release_everything():
    b = Budgets(cfg(session_ttl_s=10))
    b.admit("a", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=0)
    b.grant_nodes("a", 2, now=5)  # renews the lease
    assert b.expire(now=14) == []
    assert b.expire(now=16) == ["a"] and b.nodes_in_flight == 0 and b.deep_in_flight == 0


def test_snapshot_restore_round_trip_drops_expired():
    b = Budgets(cfg(session_ttl_s=10))
    b.admit("old", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=0)
    b.admit("new", api_key="k", tier="high", min_rounds=4, max_rounds=6, now=8)
    b.grant_nodes("new", 2, now=8)
    b.add_tokens("k", 50, now=8)
    r = Budgets.restore(b.cfg, b.snapshot(), now=8)
    assert r.snapshot() == b.snapshot()
    later = Budgets.restore(b.cfg, b.snapshot(), now=12)
    assert list(later.sessions) == ["new"] and later.nodes_in_flight == 2
    assert later.tokens_last_minute("k", 12) == 50


def test_random_workload_never_exceeds_the_node_cap():
    rng = random.Random(3)
    b = Budgets(cfg(max_tot_nodes_in_flight=4, session_ttl_s=50))
    held: dict[str, int] = {}
    for step in range(3000):
        now = step * 0.1
        sid = f"s{rng.randrange(8)}"
        op = rng.random()
        if op < 0.3:
            b.admit(sid, api_key="k", tier="high", min_rounds=1, max_rounds=rng.randint(1, 6), now=now)
        elif op < 0.6:
            held[sid] = held.get(sid, 0) + b.grant_nodes(sid, rng.randint(1, 3), now=now)
        elif op < 0.85:
            n = rng.randint(0, held.get(sid, 0))
            b.release_nodes(sid, n, now=now)
            held[sid] = held.get(sid, 0) - n
        elif op < 0.95:
            b.finish(sid, now=now)
            held.pop(sid, None)
        else:
            for gone in b.expire(now):
                held.pop(gone, None)
        assert b.nodes_in_flight <= 4
        assert b.nodes_in_flight == sum(s.nodes for s in b.sessions.values())
        assert b.deep_in_flight <= b.cfg.max_deep_sessions
