"""The sustained-load run's pure parts: percentiles, memory growth, back-to-baseline checks."""

import pytest

from bench.soak_probe import role_of
from bench.soak_stats import (
    MIB,
    depth_check,
    engine_check,
    errors_check,
    growth,
    latency_by_tier,
    memory_report,
    percentile,
    render,
    store_check,
    window_size,
)
from services.config import DepthControlConfig


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([10, 0, 20], 0) == 0 and percentile([10, 0, 20], 100) == 20
    assert percentile([1, 2], 99) == pytest.approx(1.99)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_latency_by_tier_skips_the_warm_up_and_failures():
    reqs = [
        {"tier": "low", "t_start": 5.0, "status": 200, "latency_ms": 9999.0, "round_ms": [9999.0]},  # warm-up
        {"tier": "low", "t_start": 61.0, "status": 200, "latency_ms": 100.0, "round_ms": [100.0]},
        {"tier": "low", "t_start": 62.0, "status": 200, "latency_ms": 300.0, "round_ms": [100.0, 200.0]},
        {"tier": "low", "t_start": 63.0, "status": 500, "latency_ms": 1.0, "round_ms": []},
        {"tier": "medium", "t_start": 64.0, "status": 200, "latency_ms": 400.0, "round_ms": [100.0] * 4},
    ]
    out = latency_by_tier(reqs, warmup_end_s=60.0)
    assert out["low"] == {
        "requests": 2,
        "rounds_mean": 1.5,
        "request_ms_p50": 200.0,
        "request_ms_p99": 298.0,
        "round_ms_p50": 100.0,
        "round_ms_p99": 198.0,
    }
    assert out["medium"]["requests"] == 1 and out["medium"]["rounds_mean"] == 4


def test_growth_compares_medians_of_equal_windows_after_the_warm_up():
    assert window_size(12) == 3 and window_size(30) == 6 and window_size(500) == 10
    # warm-up samples (t < 60) are ignored however large; one spike moves neither median
    samples = [(t, 500 * MIB) for t in range(0, 60, 10)]
    samples += [(60 + 10 * i, (100 + i) * MIB) for i in range(30)]
    samples[-1] = (samples[-1][0], 900 * MIB)
    g = growth(samples, warmup_end_s=60)
    assert g["window"] == 6 and g["samples"] == 30
    assert (g["start_mib"], g["end_mib"]) == (102.5, 126.5)  # medians of 100..105 and 124..128,900
    assert g["growth_pct"] == pytest.approx(100 * 24 / 102.5, abs=0.01)
    assert growth(samples[:8], warmup_end_s=60) is None  # too few samples after the warm-up


def _tick(t, **rss):
    return {"t": t, "procs": {k: {"pid": pid, "rss": v * MIB} for k, (pid, v) in rss.items()}}


def test_memory_report_flags_growth_over_the_limit_and_restarts():
    ticks = [
        _tick(t, router=(1, 100), worker=(2, 100 + t), shard=(3 if t < 50 else 4, 50)) for t in range(100)
    ]
    m = memory_report(ticks, warmup_end_s=10, limit_pct=10.0)
    assert m["processes"]["router"]["growth_pct"] == 0.0 and not m["processes"]["router"]["restarted"]
    assert m["processes"]["worker"]["growth_pct"] > 10
    assert m["processes"]["shard"]["restarted"] and m["processes"]["shard"]["pids"] == [3, 4]
    assert m["over_limit"] == ["shard", "worker", "total"] and m["measured"]
    flat = memory_report([_tick(t, router=(1, 100)) for t in range(30)], warmup_end_s=0, limit_pct=10)
    assert flat["over_limit"] == [] and flat["total"]["growth_pct"] == 0.0


def test_short_lived_children_are_set_apart_and_replaced_actors_fail():
    ticks = []
    for t in range(30):
        tick = _tick(t, worker=(2, 100), **{"worker/engine-core": (5, 1000)})
        if t in (12, 13):  # e.g. a compiler the engine ran for a moment
            tick["procs"]["worker/g++"] = {"pid": 9, "rss": 500 * MIB}
        tick["procs"]["router:old" if t < 15 else "router:new"] = {"pid": 1 if t < 15 else 3, "rss": 10 * MIB}
        ticks.append(tick)
    m = memory_report(ticks, warmup_end_s=0, limit_pct=10)
    assert m["transient"] == {"worker/g++": 2} and "worker/g++" not in m["processes"]
    assert m["total"]["start_mib"] == 1110.0 and m["total"]["growth_pct"] == 0.0  # g++ left out
    assert m["over_limit"] == ["router:new", "router:old"]


def _shard(**kw):
    base = {
        "shard": "a",
        "blocks": 0,
        "sessions": 0,
        "live_sessions": 0,
        "live_blocks": 0,
        "pinned": 0,
        "pending": 0,
        "slots_used": {"ram": 0},
        "slots_total": {"ram": 10},
    }
    return {**base, **kw}


def test_store_back_to_baseline_allows_exited_sessions_cached_blocks():
    before = [_shard()]
    # exited sessions' blocks stay (a cache, evicted first): fine; a live block or a pin is not
    assert store_check(before, [_shard(blocks=9, sessions=4, slots_used={"ram": 9})]) == []
    bad = store_check(before, [_shard(blocks=9, sessions=12, live_blocks=2, live_sessions=1, pinned=1)])
    assert bad == [
        "shard a: live_sessions 1 > baseline 0",
        "shard a: live_blocks 2 > baseline 0",
        "shard a: pinned 1 > baseline 0",
        "shard a: 12 session entries for 9 blocks",
    ]
    assert store_check(before, []) == ["shard a: gone after the load"]
    assert store_check(before, [{"shard": "a", "error": "GetTimeoutError"}]) == [
        "shard a: unreachable (GetTimeoutError)"
    ]


def test_depth_control_and_engine_back_to_baseline():
    budgets = {
        "sessions": 0,
        "deep_sessions_in_flight": 0,
        "tot_nodes_in_flight": 0,
        "sessions_waiting_for_nodes": 0,
    }
    before = {"starts": 1, "budgets": budgets}
    assert depth_check(before, before) == []
    after = {"starts": 2, "budgets": {**budgets, "sessions": 3}}
    assert depth_check(before, after) == [
        "depth control: sessions 3 > baseline 0",
        "depth control restarted (1 -> 2 starts)",
    ]
    assert depth_check(before, {"error": "GetTimeoutError"}) == [
        "depth control unreachable (GetTimeoutError)"
    ]
    idle = {"kv_cache_usage": 0.0, "requests_running": 0, "requests_waiting": 0, "unfinished_requests": 0}
    assert engine_check({"unfinished_requests": 0}, idle) == []  # no gauges before any request: 0
    assert engine_check(idle, {**idle, "kv_cache_usage": 0.02, "unfinished_requests": None}) == [
        "engine: kv_cache_usage 0.02 > baseline 0",
        "engine: unfinished_requests not reported after the load",
    ]


NAMES = DepthControlConfig()


def test_errors_check_and_roles():
    ok = {"status": 200}
    assert errors_check([ok, ok]) == []
    assert errors_check([ok, {"status": 0, "error": "ReadTimeout"}]) == [
        "1 of 2 requests failed (first: ReadTimeout)"
    ]
    assert role_of("SERVE_REPLICA::ponder#Router#ab12", "serve", NAMES) == "router"
    assert role_of("SERVE_REPLICA::ponder#ReasoningWorker#cd34", "serve", NAMES) == "worker"
    assert role_of("SERVE_PROXY_ACTOR-node1", "serve", NAMES) == "serve-proxy"
    assert role_of("SERVE_CONTROLLER_ACTOR", "serve", NAMES) == "serve-controller"
    assert role_of("ponder-kv-shard-0123456789ab", "ponder", NAMES) == "kv-shard"
    assert role_of("ponder-depth-control", "ponder", NAMES) == "depth-control"
    assert role_of("ponder-control-records", "ponder", NAMES) == "control-records"
    assert role_of("ponder-kv-keeper", "ponder", NAMES) == "kv-keeper"
    assert role_of("someone-elses-actor", "ponder", NAMES) is None
    other = DepthControlConfig(name="dc", namespace="team-a")  # names come from the app config
    assert role_of("ponder-kv-shard-0123456789ab", "team-a", other) == "kv-shard"
    assert role_of("ponder-kv-shard-0123456789ab", "ponder", other) is None
    assert role_of("dc", "team-a", other) == "depth-control"
    assert role_of("ponder-depth-control", "team-a", other) is None


def test_render_names_every_part():
    res = {
        "config": {"sessions": 2, "minutes": 1, "seed": 0, "warmup_s": 20},
        "requests": 10,
        "errors": 0,
        "requests_per_min": 10.0,
        "by_tier": latency_by_tier(
            [{"tier": "low", "t_start": 30, "status": 200, "latency_ms": 5.0, "round_ms": [5.0]}], 20
        ),
        "memory": memory_report([_tick(t, router=(1, 100)) for t in range(30)], 0, 10),
        "kv_store": {"problems": []},
        "depth_control": {"problems": []},
        "engine": {"problems": ["engine: kv_cache_usage 0.5 > baseline 0"]},
        "problems": ["engine: kv_cache_usage 0.5 > baseline 0"],
        "passed": False,
    }
    text = render(res)
    assert "| low | 1 | 1.0 | 5.0 |" in text and "| router | 100.0 | 100.0 | 0.0 |" in text
    assert "kv_store: back to baseline" in text and text.endswith(
        "FAILED: engine: kv_cache_usage 0.5 > baseline 0"
    )
