"""`ponder bench observe`: run a mixed workload on a local cluster, scrape Ray's metrics endpoint while
it runs, and render Ponder's series as a picture (the numbers the Grafana dashboard and the Ray
dashboard's metrics view plot). Writes a PNG and the time series as JSON."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import write_json

SERIES = {  # panel -> (metric, label to split by, extra label filter)
    "requests finished (by tier)": ("ray_ponder_requests_total", "tier", {}),
    "reasoning tokens (by tier)": ("ray_ponder_round_tokens_total", "tier", {"kind": "reasoning"}),
    "completion tokens (by tier)": ("ray_ponder_round_tokens_total", "tier", {"kind": "completion"}),
    "prompt tokens reused (local cache / KV store)": ("ray_ponder_round_tokens_total", "kind", {}),
    "KV store blocks (by tier)": ("ray_ponder_kv_blocks", "tier", {}),
    "depth-control decisions": ("ray_ponder_depth_decisions_total", "decision", {}),
}
KEEP_KINDS = {"kv_cached", "kv_loaded"}


COMMAND = ("observe", "mixed workload on a local cluster, metrics scraped and drawn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", default="bench/results/observe.json")
    p.add_argument("--png", default="docs/img/ponder-metrics.png")
    p.add_argument("--requests", type=int, default=12, help="requests in the workload (mixed tiers)")
    p.add_argument("--concurrency", type=int, default=3)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name.startswith("ray_ponder_"):
                keep = tuple(sorted((k, v) for k, v in s.labels.items() if k in {"tier", "kind", "decision"}))
                out[(s.name, keep)] = out.get((s.name, keep), 0.0) + s.value
    return out


def _series(snap: dict, metric: str, split: str, where: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in snap.items():
        d = dict(labels)
        if name != metric or any(d.get(k) != v2 for k, v2 in where.items()):
            continue
        key = d.get(split, "")
        if split == "kind" and key not in KEEP_KINDS:
            continue
        out[key] = out.get(key, 0.0) + v
    return out


def workload(url: str, model: str, n: int, concurrency: int) -> list[int]:
    tiers = [
        {"tier": "low"},
        {"tier": "medium", "max_rounds": 3, "min_rounds": 2},
        {"tier": "medium", "confidence_threshold": 0.0},
        {"tier": "high", "tot": {"branching": 2, "max_total_nodes": 3}},
    ]
    questions = [
        "What is 17 + 25?",
        "Name a prime above 30.",
        "How many legs do 3 spiders have?",
        "Plan a picnic.",
    ]

    def one(i: int) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": questions[i % len(questions)]}],
            "max_tokens": 32,
            "seed": i,
            "reasoning": tiers[i % len(tiers)],
        }
        with httpx.Client(base_url=url, timeout=900) as c:
            return c.post("/v1/chat/completions", json=body).status_code

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def render(timeline: list[tuple[float, dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, (metric, split, where)) in zip(axes.flat, SERIES.items(), strict=True):
        keys = sorted({k for _, snap in timeline for k in _series(snap, metric, split, where)})
        for key in keys:
            ax.plot(
                [t for t, _ in timeline],
                [_series(s, metric, split, where).get(key, 0) for _, s in timeline],
                label=key or "all",
            )
        ax.set_title(f"{title}\n{metric}", fontsize=9)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7)
    fig.suptitle("Ponder metrics scraped from Ray's metrics endpoint during `ponder bench observe`")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


def main(args: argparse.Namespace) -> int:
    from cluster.local import free_port, running
    from cluster.models import SMALL_MODEL, ensure_model
    from services.config import DEFAULT_CONFIG, AppConfig

    cfg = AppConfig.load(DEFAULT_CONFIG)
    cfg.engine.model = SMALL_MODEL  # the system is observed, not the model: the small one
    cfg.engine.model_path = str(ensure_model(cfg.engine.model))
    cfg.depth_control.state_dir = tempfile.mkdtemp(prefix="ponder-observe-state-")  # not the user's
    cfg.ray.dashboard = False
    cfg.http.port = free_port()
    cfg.ray.metrics_export_port = free_port()
    timeline: list[tuple[float, dict]] = []
    with running(cfg) as url:
        t0 = time.monotonic()
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                timeline.append((time.monotonic() - t0, scrape(cfg.ray.metrics_export_port)))
                done.wait(3)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        codes = workload(url, cfg.engine.model, args.requests, args.concurrency)
        settle = time.monotonic() + 30  # Ray exports on its own period: wait until the last request shows
        while time.monotonic() < settle:
            total = sum(
                v
                for (n, _), v in scrape(cfg.ray.metrics_export_port).items()
                if n == "ray_ponder_requests_total"
            )
            if total >= len(codes):
                break
            time.sleep(1)
        time.sleep(6)  # one more export period, so the picture's last point has everything
        done.set()
        poller.join()
        timeline.append((time.monotonic() - t0, scrape(cfg.ray.metrics_export_port)))
    render(timeline, Path(args.png))
    final = timeline[-1][1]
    res = {
        "requests": len(codes),
        "status_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
        "seconds": round(timeline[-1][0], 1),
        "final": {f"{n}{dict(ls)}": v for (n, ls), v in sorted(final.items())},
    }
    write_json(args.json_path, res)
    print(
        f"{len(codes)} requests {res['status_codes']} in {res['seconds']} s; "
        f"wrote {args.png} and {args.json_path}"
    )
    return 0 if set(codes) == {200} else 1
