"""A shortened sustained-load run (`ponder bench soak`, bench/soak.py) against the served app: two
sessions of mixed-tier multi-round requests for a minute. No request fails; the KV store, vLLM's
engine and depth control come back to their baseline; memory stays within a generous bound (the
10-minute run, `ponder bench soak`, holds it to 10%)."""

import argparse

import pytest

from bench import soak

pytestmark = pytest.mark.e2e

SHORT = {
    "minutes": 1.0,
    "sessions": 2,
    "seed": 7,
    "max_tokens": 24,
    "warmup_s": 20.0,
    "sample_s": 4.0,
    "progress_s": 30.0,
    "settle_s": 45.0,
    "memory_limit_pct": 25.0,  # a minute is short: allocator and caches still settle
    "address": "auto",
    "api_key": None,
}


@pytest.fixture(scope="module")
def result(base_url, app_config):
    args = argparse.Namespace(**SHORT)
    res = soak.run(app_config, base_url, args, app_config.ray.metrics_export_port)
    print(soak.stats.render(res))
    return res


def test_no_request_fails_and_every_tier_ran(result):
    assert result["requests"] >= 4 and result["errors"] == 0, result["failed_requests"]
    assert {"low", "medium"} <= set(result["by_tier"])
    for t in result["by_tier"].values():
        assert t["request_ms_p50"] > 0 and t["round_ms_p99"] >= t["round_ms_p50"]


def test_store_engine_and_sessions_back_to_baseline(result):
    assert result["kv_store"]["problems"] == []
    assert result["depth_control"]["problems"] == []
    assert result["engine"]["problems"] == []
    shards = result["kv_store"]["after"]
    assert shards and all(s["live_sessions"] == 0 and s["live_blocks"] == 0 for s in shards)
    assert sum(s["blocks"] for s in shards) > 0  # the store was used (exited sessions' blocks stay cached)
    assert result["depth_control"]["after"]["budgets"]["sessions"] == 0
    assert result["engine"]["after"]["kv_cache_usage"] == 0
    assert result["engine"]["after"]["unfinished_requests"] == 0


def test_memory_of_every_ponder_process_is_sampled_and_flat(result):
    mem = result["memory"]
    roles = {k.split(":")[0].split("/")[0] for k in mem["processes"]}
    assert {"router", "worker", "kv-shard", "depth-control", "serve-controller", "serve-proxy"} <= roles
    assert any(k.endswith("/engine-core") for k in mem["processes"])  # vLLM's engine-core child
    assert mem["measured"] and mem["over_limit"] == [], mem
