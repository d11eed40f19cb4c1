"""A shortened sustained-load run — the documented command, `ponder bench soak`, driving the served
app (`--url`) — two sessions of mixed-tier multi-round requests for a minute. No request fails; the
KV store, vLLM's engine and depth control come back to their baseline; memory stays within a
generous bound (the 10-minute run holds it to 10%)."""

import json

import pytest

from cluster import cli

pytestmark = pytest.mark.e2e

SHORT = [
    *("--minutes", "1", "--sessions", "2", "--seed", "7", "--max-tokens", "24"),
    *("--warmup-s", "20", "--sample-s", "4", "--progress-s", "30", "--settle-s", "45"),
    *("--memory-limit-pct", "25"),  # a minute is short: allocator and caches still settle
]


@pytest.fixture(scope="module")
def result(base_url, app_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    port = str(app_config.ray.metrics_export_port)
    argv = ["bench", "soak", *SHORT, "--url", base_url, "--metrics-port", port, "--json", str(out)]
    code = cli.main(argv)
    res = json.loads(out.read_text())
    assert code == (0 if res["passed"] else 1)  # the command's exit code says whether the checks held
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
