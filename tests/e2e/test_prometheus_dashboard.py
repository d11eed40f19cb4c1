"""The cluster as its operators see it. A real Prometheus (Debian's 2.42) scrapes a local Ponder
(two workers, the KV store on, every round spilled to the other worker) as a cluster's Prometheus
would; a mixed workload runs twice; then every panel query of the Grafana dashboard is evaluated
through Prometheus's HTTP API with the dashboard's variables substituted, over exactly the second
run. Each query must return data, and the values must agree with what the requests' own `reasoning`
objects say: counters exactly, quantiles within the histogram bucket that holds the true value.

Why two runs: `rate()` cannot see the first increment of a series that did not exist before (its
first sample already holds the value). The first run creates every series the second moves; the
window is then cut exactly at two scrapes (the last before the second run, the last after it),
where Prometheus's extrapolation is zero and `rate(x[W]) * W` is the exact increase.

The same cluster runs the Ray dashboard: its own API must list Ponder healthy, and a real browser
(headless chromium) enters Ray's token in the dashboard's dialog and takes the pages that
`ponder screenshots` writes to docs/img."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from cluster import dashboard
from cluster.local import free_port, running
from services.ingress.metrics import CONFIDENCE, NODES, ROUNDS

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/helm/ponder/dashboards/ponder-dashboard.json"
EXPORT_DEADLINE_S = 90  # Ray's processes report to the node's metrics agent every ~10 s


@pytest.fixture(scope="module")
def cfg(app_config):
    cfg = app_config.model_copy(deep=True)
    cfg.engine.block_size = 32
    cfg.worker.num_replicas = 2
    cfg.kvstore.enabled = True
    cfg.kvstore.ram_bytes = 64 << 20
    cfg.kvstore.chunk_tokens = 64
    cfg.kvstore.affinity_max_queue = 0  # each round on the other worker: its prefix comes from the store
    cfg.ray.dashboard = True
    cfg.ray.dashboard_port = free_port()
    return cfg


@pytest.fixture(scope="module")
def prometheus(cfg, tmp_path_factory):
    """Debian's prometheus binary scraping Ray's metrics export every second (scripts/system-deps.sh
    installs it); torn down with the module."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: run scripts/system-deps.sh (Debian package `prometheus`)"
    root = tmp_path_factory.mktemp("prometheus")
    (root / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{cfg.ray.metrics_export_port}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "prometheus.log", "w"),  # noqa: SIM115 - lives as long as the process
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (root / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready in 30 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def http(cfg, prometheus):
    with (
        running(cfg, progress=lambda m: print(m, flush=True)) as url,
        httpx.Client(base_url=url, timeout=600) as c,
    ):
        yield c


def query(prom: str, expr: str, at: float) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}, timeout=30)
    assert r.status_code == 200, f"{expr}: {r.text}"
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(result: list[dict]) -> float:
    return sum(float(s["value"][1]) for s in result)


def last_scrape(prom: str) -> float:
    """The timestamp of the newest scrape of Ray's metrics port (seconds, millisecond precision)."""
    res = query(prom, 'up{job="ray"}[10s]', time.time())
    assert res and res[0]["values"], "prometheus has not scraped Ray's metrics port"
    return float(res[0]["values"][-1][0])


def settle(prom: str, requests: int) -> float:
    """Wait until Prometheus has scraped all `requests` and one report period more (workers and
    shards report on their own clocks); return the newest scrape's time."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while scalar(query(prom, "sum(ray_ponder_requests_total)", time.time())) < requests:
        assert time.monotonic() < deadline, "Ponder's requests never reached Prometheus"
        time.sleep(1)
    seen = last_scrape(prom)
    while last_scrape(prom) < seen + 12:  # > Ray's 10 s metrics report interval
        time.sleep(1)
    return last_scrape(prom)


def chat(http, cfg, content: str, reasoning: dict, max_tokens: int = 16, seed: int = 1) -> dict:
    body = {
        "model": cfg.engine.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": seed,
        "reasoning": reasoning,
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code in (200, 202), r.text
    data = r.json()
    if r.status_code == 202:  # held for review: the proposed completion carries the reasoning
        approved = http.post(f"/v1/reviews/{data['id']}/approve", json={"reviewer": "prometheus-e2e"})
        assert approved.status_code == 200, approved.text
        return data["proposed"]["reasoning"]
    return data["reasoning"] | {"usage": data["usage"]}


def workload(http, cfg, topic: str) -> list[dict]:
    """Low (exits on confidence), medium (3 rounds, each loading the last's prefix on the other
    worker; `topic` differs between the runs so that the prefix is new), high as Tree-of-Thought
    (asked explicitly), critical (held for review, approved)."""
    return [
        chat(
            http,
            cfg,
            "Reply with exactly this line: Final answer: hello",
            {"tier": "low", "max_rounds": 2, "confidence_threshold": 0.0},
        ),
        chat(
            http,
            cfg,
            f"Name three {topic} and say one thing about each.",
            {"tier": "medium", "max_rounds": 3, "min_rounds": 3},
            max_tokens=40,
        ),
        chat(
            http,
            cfg,
            "Plan a short walk.",
            {"tier": "high", "strategy": "tot", "tot": {"branching": 2, "max_total_nodes": 3}},
            max_tokens=8,
        ),
        chat(http, cfg, "Is 17 prime?", {"tier": "critical", "max_rounds": 2}, max_tokens=8),
    ]


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def substitute(expr: str, window_ms: int) -> str:
    """Grafana's variables as the dashboard uses them; none may stay unresolved."""
    out = expr.replace("$__rate_interval", f"{window_ms}ms").replace("$__interval", f"{window_ms}ms")
    assert "$" not in out, f"an unresolved dashboard variable in {expr!r}"
    return out


def bucket(value: float, bounds) -> tuple[float, float]:
    """The (lower, upper] histogram bucket that holds `value`."""
    lower = 0.0
    for b in bounds:
        if value <= b:
            return lower, float(b)
        lower = float(b)
    return lower, math.inf


def test_every_dashboard_panel_agrees_with_the_requests_through_a_real_prometheus(http, cfg, prometheus):
    first = workload(http, cfg, "colours")
    t0 = settle(prometheus, len(first))
    second = workload(http, cfg, "animals")
    t1 = settle(prometheus, len(first) + len(second))
    labels = [(r["tier"], r["exit_reason"]) for r in second]
    assert labels == [(r["tier"], r["exit_reason"]) for r in first], "both runs must move the same series"
    window_ms = round((t1 - t0) * 1000)
    w = window_ms / 1000

    def q(expr: str) -> list[dict]:
        return query(prometheus, substitute(expr, window_ms), t1)

    # 1. every panel query returns data, and a number
    for title, expr in panel_queries():
        res = q(expr)
        assert res, f"panel {title!r}: no data for {expr}"
        assert any(math.isfinite(float(s["value"][1])) for s in res), f"panel {title!r}: {res}"

    by_tier = {r["tier"]: r for r in second}
    cot = [r for r in second if r["strategy"] != "tot"]
    rounds = [x for r in cot for x in r["rounds"]]

    # 2. requests by tier and exit reason: exactly the second run's
    got = {
        (s["metric"]["tier"], s["metric"]["exit_reason"]): round(float(s["value"][1]) * w, 6)
        for s in q("sum by (tier, exit_reason) (rate(ray_ponder_requests_total[$__rate_interval]))")
    }
    assert {k: v for k, v in got.items() if v} == dict(Counter(labels)), got

    # 3. the reasoning tax of a chain: reasoning tokens (every round but the last) over completion
    medium = by_tier["medium"]["rounds"]
    tax = {
        s["metric"]["tier"]: float(s["value"][1])
        for s in q(
            'sum by (tier) (rate(ray_ponder_round_tokens_total{kind="reasoning"}[$__rate_interval])) / '
            'sum by (tier) (rate(ray_ponder_round_tokens_total{kind="completion"}[$__rate_interval]))'
        )
    }
    want_tax = sum(x["completion_tokens"] for x in medium[:-1]) / sum(x["completion_tokens"] for x in medium)
    assert tax["medium"] == pytest.approx(want_tax, rel=1e-9), (tax, medium)

    # 4. rounds per request (p50): inside the bucket of each tier's one request
    p50 = {
        s["metric"]["tier"]: float(s["value"][1])
        for s in q(
            "histogram_quantile(0.5, sum by (le, tier) "
            "(rate(ray_ponder_rounds_per_request_bucket[$__rate_interval])))"
        )
    }
    for tier, r in by_tier.items():
        n = len(r["rounds"])
        lo, hi = bucket(n, ROUNDS)
        assert lo < p50[tier] <= hi, (tier, n, p50)

    # 5. tokens saved by early exit: the low request's skipped rounds at its mean round, exactly
    low = by_tier["low"]
    assert low["exit_reason"] == "confidence", low
    skipped = low["max_rounds"] - len(low["rounds"])
    mean = sum(x["completion_tokens"] for x in low["rounds"]) / len(low["rounds"])
    saved = {
        s["metric"]["tier"]: float(s["value"][1]) * w
        for s in q("sum by (tier) (rate(ray_ponder_tokens_saved_by_early_exit_total[$__rate_interval]))")
    }
    assert skipped >= 1 and saved["low"] == pytest.approx(skipped * mean, rel=1e-6), (saved, low)

    # 6. exit confidence (p50) of the low request: inside its bucket
    conf = {
        s["metric"]["tier"]: float(s["value"][1])
        for s in q(
            "histogram_quantile(0.5, sum by (le, tier) "
            "(rate(ray_ponder_exit_confidence_bucket[$__rate_interval])))"
        )
    }
    lo, hi = bucket(low["rounds"][-1]["confidence"], CONFIDENCE)
    assert lo <= conf["low"] <= hi, (conf, low["rounds"][-1])

    # 7. ToT nodes (p95) of the high request: inside its bucket
    nodes = {
        s["metric"]["tier"]: float(s["value"][1])
        for s in q(
            "histogram_quantile(0.95, sum by (le, tier) "
            "(rate(ray_ponder_tot_nodes_per_request_bucket[$__rate_interval])))"
        )
    }
    lo, hi = bucket(by_tier["high"]["tot"]["nodes"], NODES)
    assert lo < nodes["high"] <= hi, (nodes, by_tier["high"]["tot"])

    # 8. KV-loaded tokens: the medium request's later rounds loaded their prefix from the store
    loaded = sum(x["kv_loaded_tokens"] for x in rounds)
    assert loaded > 0, "no round loaded KV across workers"
    got_loaded = scalar(q('sum(rate(ray_ponder_round_tokens_total{kind="kv_loaded"}[$__rate_interval]))')) * w
    assert round(got_loaded, 6) == loaded
    # ... and the dashboard's ratio over every prompt token counted (a search counts all its nodes')
    prompt = sum(x["prompt_tokens"] for x in rounds) + by_tier["high"]["usage"]["prompt_tokens"]
    (ratio,) = q(
        'sum(rate(ray_ponder_round_tokens_total{kind="kv_loaded"}[$__rate_interval])) / '
        'sum(rate(ray_ponder_round_tokens_total{kind="prompt"}[$__rate_interval]))'
    )
    assert float(ratio["value"][1]) == pytest.approx(loaded / prompt, rel=1e-9)

    # 9. depth-control decisions: one per round of every chain
    decisions = scalar(q("sum by (decision) (rate(ray_ponder_depth_decisions_total[$__rate_interval]))")) * w
    assert round(decisions, 6) == len(rounds)


def test_the_ray_dashboard_lists_ponder_healthy_and_a_browser_takes_its_pages(
    http, cfg, prometheus, tmp_path
):
    url = f"http://127.0.0.1:{cfg.ray.dashboard_port}"
    assert dashboard.auth_mode(url) == "token"  # a new local cluster gets Ray's token auth
    assert httpx.get(f"{url}/api/serve/applications/", timeout=30).status_code == 401
    token = dashboard.auth_token()
    assert token, "Ray's token: $RAY_AUTH_TOKEN or ~/.ray/auth_token"
    app = dashboard.serve_applications(url, token)["applications"][cfg.app_name]
    assert app["status"] == "RUNNING", app["status"]
    deployments = app["deployments"]
    assert set(deployments) == {"Router", "ReasoningWorker"}, set(deployments)
    for name, d in deployments.items():
        assert d["status"] == "HEALTHY", (name, d["status"], d["message"])
        assert [r["state"] for r in d["replicas"]] == ["RUNNING"] * d["target_num_replicas"], (name, d)
    assert len(deployments["ReasoningWorker"]["replicas"]) == cfg.worker.num_replicas
    shots = dashboard.screenshots(url, tmp_path, token, prometheus, progress=lambda m: None)
    names = [p.name for p in shots]
    assert names == [f"ray-dashboard-{p.name}.png" for p in dashboard.PAGES] + [
        "prometheus-ponder-requests.png"
    ]
    for p in shots:  # a real PNG of a full page, not an error tile
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, (p, len(data))
    with pytest.raises(dashboard.DashboardError, match="refused the token"):
        dashboard.serve_applications(url, "not-the-token")
