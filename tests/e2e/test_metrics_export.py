"""Real requests against a local cluster; Ray's metrics endpoint is scraped and Ponder's series must
exist and move by exactly what the requests did."""

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

DEADLINE_S = 60  # Ray exports metrics every few seconds


def scrape(cfg) -> dict[tuple[str, tuple], float]:
    body = httpx.get(f"http://127.0.0.1:{cfg.ray.metrics_export_port}/metrics", timeout=10).text
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            keep = tuple(sorted((k, v) for k, v in s.labels.items() if k in LABELS))
            out[(s.name, keep)] = out.get((s.name, keep), 0.0) + s.value
    return out


LABELS = {"tier", "strategy", "exit_reason", "status", "kind", "decision", "decided_by", "op", "le", "rate"}


def total(snap, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in snap.items() if n == name and want <= set(ls))


def wait_for(cfg, check):
    """Scrape until `check(snapshot)` holds (Ray exports on its own period) or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        snap = scrape(cfg)
        if check(snap) or time.monotonic() > deadline:
            return snap
        time.sleep(1)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=300) as c:
        yield c


def test_a_three_round_request_moves_ponder_series_by_its_amounts(http, app_config):
    before = scrape(app_config)
    body = {
        "model": app_config.engine.model,
        "messages": [{"role": "user", "content": "What is 6 times 7? Explain briefly."}],
        "max_tokens": 16,
        "temperature": 0,
        "reasoning": {"tier": "medium", "max_rounds": 3, "min_rounds": 3},
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    rounds = r.json()["reasoning"]["rounds"]
    assert len(rounds) == 3
    req = "ray_ponder_requests_total"
    snap = wait_for(app_config, lambda s: total(s, req, status="ok") - total(before, req, status="ok") >= 1)

    def moved(name, **labels):
        return total(snap, name, **labels) - total(before, name, **labels)

    assert moved(req, tier="medium", strategy="cot", status="ok") == 1
    assert moved("ray_ponder_rounds_per_request_count", tier="medium") == 1
    # Ray approximates histogram sums: the buckets say exactly where the 3 rounds fell.
    buckets = "ray_ponder_rounds_per_request_bucket"
    assert moved(buckets, tier="medium", le="3.0") == 1 and moved(buckets, tier="medium", le="2.0") == 0
    assert moved("ray_ponder_round_latency_seconds_count", tier="medium") == 3
    assert moved("ray_ponder_round_ttft_seconds_count", tier="medium") == 3
    tokens = "ray_ponder_round_tokens_total"
    assert moved(tokens, tier="medium", kind="completion") == sum(x["completion_tokens"] for x in rounds)
    assert moved(tokens, tier="medium", kind="prompt") == sum(x["prompt_tokens"] for x in rounds)
    assert moved(tokens, kind="reasoning") == sum(x["completion_tokens"] for x in rounds[:2])
    assert moved(tokens, kind="kv_cached") == sum(x["kv_cached_tokens"] for x in rounds)
    assert moved("ray_ponder_depth_decisions_total") == 3
    assert moved("ray_ponder_exit_confidence_count", tier="medium") == 1


def test_kv_store_and_vllm_series_are_exported(http, app_config):
    body = {
        "model": app_config.engine.model,
        "messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
        "max_tokens": 40,
        "temperature": 0,
        "reasoning": {"tier": "medium", "max_rounds": 2, "min_rounds": 2},
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    names = ("ray_ponder_kv_blocks", "ray_ponder_kv_events_total", "ray_ponder_kv_connector_blocks_total")

    def ready(s):
        return all(total(s, n) > 0 for n in names) and any(n.startswith("ray_vllm_") for n, _ in s)

    snap = wait_for(app_config, ready)
    assert total(snap, "ray_ponder_kv_blocks") > 0  # the shard holds the session's blocks
    assert total(snap, "ray_ponder_kv_events_total", kind="save") > 0
    assert total(snap, "ray_ponder_kv_connector_blocks_total", op="saved") > 0
    assert total(snap, "ray_ponder_kv_cost_model", rate="prefill_tokens_per_s") > 0
    assert any(n.startswith("ray_vllm_") for n, _ in snap), "vLLM's engine metrics are carried through"


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/helm/ponder/dashboards/ponder-dashboard.json"


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs and all(p["datasource"]["type"] == "prometheus" for p in dash["panels"])
    return {m for e in exprs for m in re.findall(r"\b(ray_[a-z0-9_]+)", e)}


def test_every_dashboard_query_names_an_exported_metric(http, app_config):
    model = app_config.engine.model
    early = {  # confidence threshold 0: exits after its first round (it states an answer), below 2
        "model": model,
        "messages": [{"role": "user", "content": "Reply with exactly this line: Final answer: hello"}],
        "max_tokens": 16,
        "temperature": 0,
        "reasoning": {"tier": "low", "max_rounds": 2, "confidence_threshold": 0.0},
    }
    r = http.post("/v1/chat/completions", json=early)
    assert r.status_code == 200 and r.json()["reasoning"]["exit_reason"] == "confidence", r.text
    tot = {
        "model": model,
        "messages": [{"role": "user", "content": "Plan a short walk."}],
        "max_tokens": 8,
        "seed": 1,
        "reasoning": {"tier": "high", "tot": {"branching": 2, "max_total_nodes": 3}},
    }
    assert http.post("/v1/chat/completions", json=tot).status_code == 200
    wanted = dashboard_metrics()
    assert len(wanted) >= 15
    snap = wait_for(app_config, lambda s: wanted <= {n for n, _ in s})
    missing = wanted - {n for n, _ in snap}
    assert not missing, f"dashboard queries metrics nobody exported: {sorted(missing)}"


def test_ponder_status_reports_the_running_cluster(http, app_config):
    import os
    import subprocess
    import sys

    import ray

    from cluster.status import collect, render

    s = collect("auto")
    assert [n["alive"] for n in s["nodes"]] == [True]
    assert len(s["workers"]) == app_config.worker.num_replicas
    assert all(w["ongoing_requests"] >= 0 for w in s["workers"])
    (shard,) = s["kv_shards"]
    assert shard["blocks"] > 0 and shard["slots_used"]["ram"] == shard["blocks"]  # earlier tests' rounds
    assert (
        s["depth_control"]["budgets"]["max_deep_sessions"]
        == app_config.depth_control.budgets.max_deep_sessions
    )
    text = render(s)
    assert "KV shards (1)" in text and "Workers (1)" in text and "Depth control" in text
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "status", "--address", ray.get_runtime_context().gcs_address],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 0, out.stderr
    assert "KV shards (1)" in out.stdout and "requests in flight" in out.stdout
