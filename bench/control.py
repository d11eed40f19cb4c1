"""`ponder bench control`: what depth control costs a round as sessions in flight grow.

The real router (its FastAPI app, chat handler, planner and round loop: `services/ingress/router.py`,
instantiated in this process and called over ASGI) runs chain requests of R rounds against a scripted
worker (tokens at once: no model time) and the real depth-control and records actors on a local Ray
cluster. For each number of sessions in flight it reports:
- the verdict wait per round (p50/p99): the time from a round's end to its verdict, timed by the
  router's DepthClient (what the `ray_ponder_depth_decision_seconds` histogram records);
- depth-control calls per request, counted by the actor itself (`stats()["calls"]`).
Both ways of deciding run in one run: `router` (the default: verdicts under the plan granted at
admission) and `actor` (the actor asked after every round the guards do not settle; the pre-issue-15
path). Then Tree-of-Thought requests: actor calls per request against 2 + ceil(expansions / node
lease). Last, the actor's own saturation rate: sessions (admit + finish) per second, 256 callers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator

from bench import write_json
from bench.overhead import percentile
from services.config import DEFAULT_CONFIG, AppConfig

COMMAND = ("control", "depth control's cost per round as sessions in flight grow (scripted worker)")
MODES = ("router", "actor")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="app config YAML")
    p.add_argument(
        "--sessions",
        default="1,4,16,64,256,1024",
        help="comma-separated sessions in flight to measure (default 1,4,16,64,256,1024)",
    )
    p.add_argument("--rounds", type=int, default=4, help="rounds per request (min 1, threshold never met)")
    p.add_argument("--min-requests", type=int, default=32, help="requests per level, at least")
    p.add_argument("--modes", default=",".join(MODES), help="router, actor or both (default both)")


def levels_of(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(n < 1 or n > 4096 for n in levels):
        raise SystemExit(f"--sessions must be a comma-separated list of 1..4096; got {text!r}")
    return levels


class ScriptedWorker:
    """Stands in for the worker deployment's Serve handle: every round is `tokens` tokens, streamed
    at once, each with flat top-5 logprobs (low confidence: the exit rule never fires)."""

    def __init__(self, tokens: int = 4, vocab_size: int = 32000) -> None:
        self.tokens, self.vocab = tokens, vocab_size

    def options(self, **_: object) -> ScriptedWorker:
        return self

    @property
    def engine_info(self):
        return _Remote(self._info)

    @property
    def generate_stream(self):
        return _Remote(self._stream)

    @property
    def generate_n(self):
        return _Remote(self._children)

    async def _children(self, rid: str, prompt: list[int], spec: dict, n: int, session: str | None = None):
        top = [[i, -1.6] for i in range(5)]
        one = {"token_ids": [100 + i for i in range(self.tokens)], "logprobs": [top] * self.tokens}
        return [
            {**one, "text": f" child {c}", "finish_reason": "length", "prompt_tokens": len(prompt)}
            for c in range(n)
        ]

    async def _info(self) -> dict:
        return {"vocab_size": self.vocab, "max_model_len": 4096}

    async def _stream(
        self, rid: str, prompt: list[int], spec: dict, session: str | None = None, follow: bool = False
    ):
        top = [[i, -1.6] for i in range(5)]
        for i in range(self.tokens):
            last = i == self.tokens - 1
            yield {
                "text": f" w{i}",
                "token_ids": [100 + i],
                "logprobs": [top],
                "finished": last,
                "finish_reason": "length" if last else None,
                "prompt_tokens": len(prompt),
            }


class _Remote:
    def __init__(self, fn) -> None:
        self.remote = fn


def bench_config(args: argparse.Namespace, mode: str) -> AppConfig:
    from cluster.models import TINY_MODEL, ensure_model

    cfg = AppConfig.load(args.config)
    cfg.engine.model = TINY_MODEL
    cfg.engine.model_path = str(ensure_model(TINY_MODEL))  # its tokenizer renders the prompts
    cfg.kvstore.enabled = False
    cfg.auth.api_keys_file = None
    d = cfg.depth_control
    d.state_dir = tempfile.mkdtemp(prefix="ponder-control-bench-")  # not the user's
    d.name, d.records_name, d.verdicts = f"bench-depth-{mode}", f"bench-records-{mode}", mode
    d.budgets.max_sessions = 100_000
    d.budgets.max_deep_sessions = 100_000  # pressure is not what is measured
    d.budgets.tokens_per_minute_per_key = None
    cfg.router.depth_control_timeout_s = 30.0  # measure the wait, do not cut it short
    return cfg


async def make_router(cfg: AppConfig):
    """The real router class, outside Serve: its ASGI app and its DepthClient. (Serve's ingress
    wrapper makes `__init__` a coroutine, which Serve awaits; so do we. Its routes find their
    instance in Serve's replica context, which this process stands in for.)"""
    from types import SimpleNamespace

    from ray import serve

    from services.ingress.router import Router

    cls = Router.func_or_class
    router = cls.__new__(cls)
    await cls.__init__(router, cfg.model_dump(), ScriptedWorker())
    serve.get_replica_context = lambda: SimpleNamespace(servable_object=router)
    logging.getLogger("ponder").setLevel(logging.WARNING)  # no log line per round and request
    return router


@contextlib.contextmanager
def outside_serve() -> Iterator[None]:
    """Put back what `make_router` changes in this process: Serve's replica context and the level of
    Ponder's loggers (the router's __init__ sets it). Run it in a process of its own all the same (as
    the CLI does): Ray aborts a process that later pickles a handle of a cluster that is gone."""
    from ray import serve

    context, level = serve.get_replica_context, logging.getLogger("ponder").level
    try:
        yield
    finally:
        serve.get_replica_context = context
        logging.getLogger("ponder").setLevel(level)


async def run_level(router, cfg: AppConfig, sessions: int, args: argparse.Namespace) -> dict:
    import httpx
    import ray

    waits: list[float] = []
    router.control.on_decision = lambda seconds, decided_by: waits.append(seconds)
    requests = max(sessions, args.min_requests)
    body = {
        "model": cfg.engine.model,
        "messages": [{"role": "user", "content": "What is 17 + 25?"}],
        "max_tokens": 4,
        "reasoning": {
            "tier": "high",
            "strategy": "cot",
            "min_rounds": 1,
            "max_rounds": args.rounds,
            "confidence_threshold": 1.0,
        },
    }
    before = ray.get(router.depth.stats.remote())["calls"]
    gate, failures, decided = asyncio.Semaphore(sessions), 0, {}
    transport = httpx.ASGITransport(app=router)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:

        async def one() -> None:
            nonlocal failures
            async with gate:
                r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                failures += 1
                return
            for x in r.json()["reasoning"]["rounds"]:
                decided[x["decided_by"]] = decided.get(x["decided_by"], 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        wall = time.perf_counter() - t0
    calls = await _settled_calls(router, before, requests)
    return {
        "sessions": sessions,
        "requests": requests,
        "failures": failures,
        "added_ms_p50": percentile(waits, 50) * 1000,
        "added_ms_p99": percentile(waits, 99) * 1000,
        "added_ms_mean": statistics.fmean(waits) * 1000 if waits else 0.0,
        "verdicts": len(waits),
        "decided_by": decided,
        "actor_calls_per_request": sum(calls.values()) / requests,
        "actor_calls": calls,
        "requests_per_s": requests / wall,
    }


async def run_tot(router, cfg: AppConfig, requests: int = 16, in_flight: int = 4) -> dict:
    """Tree-of-Thought requests (branching 2, up to 10 nodes): actor calls per request against the
    bound 2 + ceil(expansions / node_lease)."""
    import httpx

    body = {
        "model": cfg.engine.model,
        "messages": [{"role": "user", "content": "What is 17 + 25?"}],
        "max_tokens": 4,
        "reasoning": {"tier": "high", "strategy": "tot", "tot": {"branching": 2, "max_total_nodes": 10}},
    }
    before = (await router.depth.stats.remote())["calls"]
    gate, expansions = asyncio.Semaphore(in_flight), []
    transport = httpx.ASGITransport(app=router)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as client:

        async def one() -> None:
            async with gate:
                r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            expansions.append(r.json()["choices"][0]["message"]["reasoning_content"].count("[tot: expanding"))

        await asyncio.gather(*(one() for _ in range(requests)))
    calls = await _settled_calls(router, before, requests)
    lease = cfg.depth_control.node_lease
    return {
        "requests": requests,
        "expansions_per_request": statistics.fmean(expansions),
        "node_lease": lease,
        "actor_calls_per_request": sum(calls.values()) / requests,
        "bound_per_request": statistics.fmean(2 + -(-e // lease) for e in expansions),
        "actor_calls": calls,
    }


async def _settled_calls(router, before: dict, requests: int) -> dict:
    """The actor's calls during the level, once every request's fire-and-forget finish landed."""
    deadline = time.monotonic() + 60
    while True:
        after = await router.depth.stats.remote()
        calls = {k: after["calls"].get(k, 0) - before.get(k, 0) for k in after["calls"]}
        if calls.get("finish", 0) >= requests or time.monotonic() > deadline:
            return {k: v for k, v in calls.items() if v}
        await asyncio.sleep(0.05)


async def saturation(router, in_flight: int = 256, seconds: float = 3.0) -> float:
    """Sessions per second the actor serves with `in_flight` callers outstanding: each an admission
    awaited and a finish sent (a chain request's two calls)."""
    done, stop = 0, time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < stop:
            sid = f"sat-{i}-{n}"
            await router.depth.admit.remote(sid, "bench", "low", 1, 2, "general")
            router.depth.finish.remote(sid, "bench", 0, [])
            done, n = done + 1, n + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(in_flight)))
    return done / (time.perf_counter() - t0)


async def measure_mode(
    cfg: AppConfig, args: argparse.Namespace, levels: list[int], mode: str, last: bool
) -> dict:
    router = await make_router(cfg)
    out = []
    for n in levels:
        res = await run_level(router, cfg, n, args)
        out.append(res)
        print(
            f"  {mode:6} {n:5} sessions: verdict wait p50 {res['added_ms_p50']:8.3f} ms, "
            f"p99 {res['added_ms_p99']:8.3f} ms, {res['actor_calls_per_request']:.2f} actor calls/request",
            flush=True,
        )
    tot = await run_tot(router, cfg) if mode == "router" else None
    if tot is not None:
        print(
            f"  tot: {tot['actor_calls_per_request']:.2f} actor calls/request for "
            f"{tot['expansions_per_request']:.1f} expansions (bound {tot['bound_per_request']:.2f})",
            flush=True,
        )
    rate = await saturation(router) if last else None
    return {"levels": out, "tot": tot, "rate": rate}


def main(args: argparse.Namespace) -> int:
    import warnings

    import ray

    from services.control.launch import start_control

    levels = levels_of(args.sessions)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes must name router and/or actor; got {args.modes!r}")
    # Serve's ingress wrapper has an async __del__ (Serve awaits it; a plain process cannot).
    warnings.filterwarnings("ignore", message=".*ASGIIngressWrapper.__del__")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results, rate, tot = {}, None, None
    try:
        with outside_serve():
            for mode in modes:
                cfg = bench_config(args, mode)
                start_control(cfg.depth_control, cfg.engine.model)
                print(f"{mode}: verdicts by the {mode}", flush=True)
                got = asyncio.run(measure_mode(cfg, args, levels, mode, last=mode == modes[-1]))
                results[mode], tot, rate = got["levels"], tot or got["tot"], got["rate"]
    finally:
        ray.shutdown()
    res = summarize(results, rate, tot, args)
    print_table(res)
    if args.json_path:
        print(f"wrote {write_json(args.json_path, res)}")
    return 0


def summarize(
    results: dict[str, list[dict]], rate: float | None, tot: dict | None, args: argparse.Namespace
) -> dict:
    main_mode = "router" if "router" in results else next(iter(results))
    levels = results[main_mode]
    return {
        "mode": main_mode,
        "rounds_per_request": args.rounds,
        "actor_calls_per_request": max(x["actor_calls_per_request"] for x in levels),
        "levels": [
            {k: x[k] for k in ("sessions", "added_ms_p50", "added_ms_p99", "actor_calls_per_request")}
            for x in levels
        ],
        "by_mode": results,
        "tot": tot,
        "actor_sessions_per_s": rate,
        "actor_calls_per_s": None if rate is None else 2 * rate,
    }


def print_table(res: dict) -> None:
    print(f"\nverdict wait per round, chain requests of {res['rounds_per_request']} rounds, scripted worker")
    head = ("sessions", "p50 ms", "p99 ms", "calls/req", "req/s", "fail")
    print(f"{'verdicts':8} " + " ".join(f"{h:>9}" for h in head))
    for mode, levels in res["by_mode"].items():
        for x in levels:
            print(
                f"{mode:8} {x['sessions']:9} {x['added_ms_p50']:9.3f} {x['added_ms_p99']:9.3f} "
                f"{x['actor_calls_per_request']:9.2f} {x['requests_per_s']:9.1f} {x['failures']:9}"
            )
    if res["tot"] is not None:
        t = res["tot"]
        print(
            f"tree-of-thought: {t['actor_calls_per_request']:.2f} actor calls/request, "
            f"{t['expansions_per_request']:.1f} expansions, bound 2 + ceil(expansions / {t['node_lease']}) "
            f"= {t['bound_per_request']:.2f}"
        )
    if res["actor_sessions_per_s"] is not None:
        rate = res["actor_sessions_per_s"]
        print(
            f"depth-control actor saturates at {rate:.0f} sessions/s = {2 * rate:.0f} calls/s (256 in flight)"
        )
