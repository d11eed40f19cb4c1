"""`ponder bench soak`: a bounded sustained-load run that proves nothing leaks.

N concurrent sessions (threads on loopback HTTP, fixed seed) each send multi-round chat completions
of mixed tiers back to back for a fixed time. Meanwhile every Ponder process's RSS is sampled
(routers, workers and their vLLM engine cores, KV shards, depth control, Serve's controller and
proxy). Before and after the load it reads the KV shards' and depth control's accounting and vLLM's
engine gauges. It passes when no request failed, memory stayed within the limit (start after the
warm-up vs end, bench/soak_stats.py), and store, engine and sessions came back to baseline.
Starts its own local cluster with the app config, or drives one already serving (`--url`).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import threading
import time
from urllib.parse import urlparse

import httpx

from bench import soak_probe as probe
from bench import soak_stats as stats
from bench import write_json

# tier -> (the request's `reasoning` object, weight): mostly short low/medium sessions, some ToT.
MIX = {
    "low": ({"tier": "low"}, 0.45),
    "medium": ({"tier": "medium"}, 0.45),
    "high": ({"tier": "high", "tot": {"branching": 2, "max_total_nodes": 4}}, 0.10),
}
QUESTIONS = [
    "What is 17 + 25?",
    "How many legs do 3 spiders have?",
    "Name a prime number above 30.",
    "What is 12 times 11?",
    "Which is heavier, a kilogram of iron or a kilogram of feathers?",
    "If a train leaves at 3 pm and travels 2 hours, when does it arrive?",
    "What is the capital of France?",
    "Plan a short picnic for four people.",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


COMMAND = ("soak", "sustained load: memory flat, store/engine/sessions back to baseline")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="duration of the load")
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions (request loops)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per round")
    p.add_argument("--warmup-s", type=float, default=60.0, help="excluded from latency and memory start")
    p.add_argument("--sample-s", type=float, default=10.0, help="memory sampling period")
    p.add_argument("--progress-s", type=float, default=30.0, help="progress line period")
    p.add_argument("--settle-s", type=float, default=60.0, help="most to wait for accounting to settle")
    p.add_argument("--memory-limit-pct", type=float, default=10.0, help="largest RSS growth allowed")
    p.add_argument("--config", help="app config YAML (default: configs/local-cpu.yaml)")
    p.add_argument("--url", help="drive an app already serving here (loopback) instead of starting one")
    p.add_argument(
        "--address",
        default="auto",
        help="its Ray cluster, host:port (with --url; Ray's token: RAY_AUTH_MODE=token)",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="its Ray metrics port (with --url)")
    p.add_argument("--api-key", default=os.environ.get("PONDER_API_KEY"), help="when the app wants one")
    p.add_argument("--json", dest="json_path", default="bench/results/soak.json")


class Load:
    """The session loops; each request's outcome is appended to `done` (thread-safe by the GIL)."""

    def __init__(
        self, url: str, model: str, sessions: int, seed: int, max_tokens: int, api_key: str | None = None
    ) -> None:
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.n, self.seed = sessions, seed
        self.done: list[dict] = []
        self.t0 = 0.0

    def body(self, rng: random.Random) -> tuple[str, dict]:
        tier = rng.choices(list(MIX), weights=[w for _, w in MIX.values()])[0]
        return tier, {
            "model": self.model,
            "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
            "max_tokens": self.max_tokens,
            "seed": rng.randrange(1 << 30),
            "reasoning": MIX[tier][0],
        }

    def one(self, client: httpx.Client, session: int, rng: random.Random) -> dict:
        tier, body = self.body(rng)
        t = time.monotonic()
        rec = {"session": session, "tier": tier, "t_start": round(t - self.t0, 3), "round_ms": []}
        try:
            r = client.post("/v1/chat/completions", json=body)
            rec["status"] = r.status_code
            if r.status_code == 200:
                rec["round_ms"] = [x["latency_ms"] for x in r.json()["reasoning"]["rounds"]]
            else:
                rec["error"] = r.text[:300]
        except Exception as exc:  # a failed request is counted, never ends the run
            rec["status"], rec["error"] = 0, f"{type(exc).__name__}: {exc}"[:300]
        rec["latency_ms"] = round((time.monotonic() - t) * 1000.0, 1)
        return rec

    def loop(self, session: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + session)
        with httpx.Client(base_url=self.url, timeout=600, headers=self.headers) as client:
            while time.monotonic() < deadline:
                self.done.append(self.one(client, session, rng))

    def start(self, seconds: float) -> list[threading.Thread]:
        """Start the session loops (each ends with its first request after `seconds`)."""
        self.t0 = time.monotonic()
        deadline = self.t0 + seconds
        threads = [threading.Thread(target=self.loop, args=(i, deadline), daemon=True) for i in range(self.n)]
        for t in threads:
            t.start()
        return threads


class Sampler(threading.Thread):
    """Samples every Ponder process's RSS until stopped; prints a progress line now and then."""

    def __init__(self, load: Load, names, sample_s: float, progress_s: float, log=print) -> None:
        super().__init__(daemon=True)
        self.load, self.names, self.sample_s, self.progress_s, self.log = (
            load,
            names,
            sample_s,
            progress_s,
            log,
        )
        self.ticks: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        actors, last_progress = probe.ponder_actors(self.names), 0.0
        while not self.stop.is_set():
            t = time.monotonic() - self.load.t0
            procs = probe.memory(actors)
            if len(procs) < len(actors):  # an actor restarted or moved: look them up again
                actors = probe.ponder_actors(self.names)
            self.ticks.append({"t": round(t, 2), "procs": procs})
            if t - last_progress >= self.progress_s:
                last_progress = t
                done = self.load.done
                rss = sum(p["rss"] for p in procs.values()) / stats.MIB
                errs = sum(r["status"] != 200 for r in done)
                self.log(f"  [{t:5.0f} s] {len(done)} requests, {errs} errors, Ponder RSS {rss:.0f} MiB")
            self.stop.wait(self.sample_s)


def settle(address: str, names, baseline: dict, seconds: float) -> dict:
    """Cluster state once the sessions' ends have landed (they are fire-and-forget) or time is up."""
    deadline = time.monotonic() + seconds
    while True:
        state = probe.cluster_state(address, names)
        quiet = not stats.depth_check(baseline["depth_control"], state["depth_control"]) and not (
            stats.store_check(baseline["kv_shards"], state["kv_shards"])
        )
        if quiet or time.monotonic() > deadline:
            return state
        time.sleep(2)


ENGINE_SETTLE_S = 20.0  # vLLM sets its gauges at each engine step; Ray drops them ~25 s after the last


def engine_state(cfg, metrics_port: int, after: bool) -> dict:
    """vLLM's gauges (after the load: once they read idle, gone, or time is up) and the workers'
    unfinished requests."""
    deadline = time.monotonic() + (ENGINE_SETTLE_S if after else 0)
    while True:
        gauges = probe.vllm_gauges(metrics_port)
        idle = all(gauges.get(k) == 0 for k in probe.VLLM_GAUGES.values())
        if not after or idle or not gauges or time.monotonic() > deadline:
            break
        time.sleep(1)
    return {**gauges, **probe.engine_stats(cfg.app_name, cfg.worker.num_replicas)}


def served_model(url: str, api_key: str | None) -> str:
    """The model the app at `url` serves (its /v1/models), whichever config started it."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def run(cfg, url: str, args: argparse.Namespace, metrics_port: int, log=print) -> dict:
    """The load and the checks against an app serving at `url` (this process joined its cluster)."""
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"the soak drives loopback only; got {url}")
    before = probe.cluster_state(args.address, cfg.depth_control)
    before["state_file_bytes"] = probe.state_file_bytes(cfg.depth_control.state_dir)
    before["engine"] = engine_state(cfg, metrics_port, after=False)
    load = Load(url, served_model(url, args.api_key), args.sessions, args.seed, args.max_tokens, args.api_key)
    sampler = Sampler(load, cfg.depth_control, args.sample_s, args.progress_s, log)
    log(f"load: {args.sessions} sessions for {args.minutes} min (warm-up {args.warmup_s:g} s excluded)")
    threads = load.start(args.minutes * 60.0)
    sampler.start()
    for t in threads:
        t.join()
    sampler.stop.set()
    sampler.join()
    elapsed = time.monotonic() - load.t0
    log(f"load done: {len(load.done)} requests in {elapsed:.0f} s; waiting for the accounting to settle")
    engine = engine_state(cfg, metrics_port, after=True)  # first: its gauges go stale when idle
    after = settle(args.address, cfg.depth_control, before, args.settle_s)
    after["engine"] = engine
    after["state_file_bytes"] = probe.state_file_bytes(cfg.depth_control.state_dir)
    return report(args, load.done, sampler.ticks, before, after, elapsed)


def report(args, done: list[dict], ticks: list[dict], before: dict, after: dict, elapsed: float) -> dict:
    parts = {
        "kv_store": stats.store_check(before["kv_shards"], after["kv_shards"]),
        "depth_control": stats.depth_check(before["depth_control"], after["depth_control"]),
        "engine": stats.engine_check(before["engine"], after["engine"]),
    }
    memory = stats.memory_report(ticks, args.warmup_s, args.memory_limit_pct)
    problems = stats.errors_check(done) + [p for ps in parts.values() for p in ps]
    if not memory["measured"]:
        problems.append("memory: too few samples after the warm-up")
    problems += [f"memory: {k} grew more than {args.memory_limit_pct}%" for k in memory["over_limit"]]
    depth = {k: v for k, v in before["depth_control"].items() if k != "decisions"}
    return {
        "config": {
            "minutes": args.minutes,
            "sessions": args.sessions,
            "seed": args.seed,
            "max_tokens": args.max_tokens,
            "warmup_s": args.warmup_s,
            "sample_s": args.sample_s,
            "mix": {t: w for t, (_, w) in MIX.items()},
        },
        "duration_s": round(elapsed, 1),
        "requests": len(done),
        "errors": sum(r["status"] != 200 for r in done),
        "requests_per_min": round(len(done) / (elapsed / 60.0), 1) if elapsed else None,
        "by_tier": stats.latency_by_tier(done, args.warmup_s),
        "memory": memory,
        "kv_store": {
            "before": before["kv_shards"],
            "after": after["kv_shards"],
            "problems": parts["kv_store"],
        },
        "depth_control": {
            "before": depth,
            "after": {k: v for k, v in after["depth_control"].items() if k != "decisions"},
            "problems": parts["depth_control"],
        },
        "engine": {"before": before["engine"], "after": after["engine"], "problems": parts["engine"]},
        # Disk, not memory: depth control keeps every finished request for feedback (not pruned).
        "state_file_bytes": {"before": before["state_file_bytes"], "after": after["state_file_bytes"]},
        "failed_requests": [r for r in done if r["status"] != 200][:5],
        "memory_samples": ticks,
        "problems": problems,
        "passed": not problems,
    }


def write(res: dict, path: str) -> None:
    write_json(path, res)


def main(args: argparse.Namespace) -> int:
    from cluster.local import free_port, running
    from cluster.models import SMALL_MODEL, ensure_model
    from services.config import DEFAULT_CONFIG, AppConfig

    cfg = AppConfig.load(args.config or DEFAULT_CONFIG)
    if args.url:
        import ray

        from cluster.local import connect

        if not ray.is_initialized():  # a caller already on that cluster (the test suite) keeps its connection
            connect(args.address, cfg.depth_control.namespace, log_to_driver=False, logging_level="ERROR")
        res = run(cfg, args.url, args, args.metrics_port)
    else:
        if not args.config:
            cfg.engine.model = SMALL_MODEL  # the system is soaked, not the model: the small one
        cfg.engine.model_path = str(ensure_model(cfg.engine.model))
        cfg.depth_control.state_dir = tempfile.mkdtemp(prefix="ponder-soak-state-")  # not the user's
        cfg.ray.dashboard = False
        cfg.http.port = free_port()
        cfg.ray.metrics_export_port = free_port()
        with running(cfg) as url:
            res = run(cfg, url, args, cfg.ray.metrics_export_port)
    write(res, args.json_path)
    print(stats.render(res))
    print(f"wrote {args.json_path}")
    return 0 if res["passed"] else 1
