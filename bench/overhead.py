"""`ponder bench overhead`: time the router + depth control add to each round, against calling the
worker deployment's handle directly with the same kind of rounds.

Both paths run on one local cluster in one run, interleaved request by request:
- direct: the driver renders each round's prompt with the same tokenizer and prompt builder and calls
  `ReasoningWorker.generate_stream` through a Serve handle (the call the router makes), R rounds;
- routed: the OpenAI HTTP API with `min_rounds = 1, max_rounds = R` and a confidence threshold of 1.0
  that no round reaches, so the router runs R rounds: depth control admits the request and grants
  its plan, the router decides every round under it (`decided_by: router`; the last is the
  ceiling) and reports the rounds at finish.
Every round generates exactly `max_tokens` tokens (`ignore_eos`), and each request asks a question of
its own (no prefix-cache sharing between the two paths). Per request, the per-round time is the
request's wall time / R; the added time is routed minus direct at the same percentile.

`--keys` runs it on clusters one after the other, without API keys and with a keys file whose key
has request and token limits (high enough never to refuse, so every request is counted against
them: the router's own window and depth control's cluster-wide one at admission) and every request
sending that key, in ABBA order over `--pairs`. It reports both and their difference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import httpx

from bench import write_json
from services.config import DEFAULT_CONFIG, AppConfig

COMMAND = ("overhead", "time added per round by router + depth control")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="app config YAML")
    p.add_argument(
        "--model",
        default="tiny-random-llama",
        help="model to serve (default: the tiny random model; overhead is model-free)",
    )
    p.add_argument("--requests", type=int, default=40, help="requests per path")
    p.add_argument("--rounds", type=int, default=4, help="rounds per request")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per round")
    p.add_argument(
        "--keys",
        action="store_true",
        help="also run with API keys and per-key limits configured, and compare",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="with --keys: pairs of clusters, in ABBA order (2: without, with, with, without)",
    )


KEY_LIMITS = {"requests_per_minute": 100_000, "tokens_per_minute": 100_000_000}  # counted, never hit


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def bench_config(args: argparse.Namespace) -> AppConfig:
    from cluster.local import free_port
    from cluster.models import ensure_model

    cfg = AppConfig.load(args.config)
    cfg.engine.model = args.model
    cfg.engine.model_path = str(ensure_model(args.model))
    cfg.engine.max_model_len = 2048
    cfg.engine.kv_cache_memory_bytes = 128 << 20
    cfg.depth_control.state_dir = tempfile.mkdtemp(prefix="ponder-overhead-state-")  # not the user's
    cfg.ray.dashboard = False
    cfg.http.port = free_port()
    return cfg


async def direct_request(worker, tokenizer, question: str, rounds: int, max_tokens: int) -> float:
    from services.reasoning.prompts import Message, round_messages

    conversation = [Message("user", question)]
    texts: list[str] = []
    spec = {
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
        "stop": (),
        "top_logprobs": 5,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    for i in range(rounds):
        prompt = tokenizer.render(round_messages(conversation, texts))
        parts = []
        async for d in worker.options(stream=True).generate_stream.remote(f"d-{question}-{i}", prompt, spec):
            parts.append(d["text"])
        texts.append("".join(parts))
    return (time.perf_counter() - start) * 1000.0


def with_key(cfg: AppConfig) -> str:
    """Configure one API key with limits (a keys file in a temporary folder); return the key."""
    from pathlib import Path

    import yaml

    from cluster.keys import new_key
    from services.ingress.auth import hash_key

    key = new_key()
    path = Path(tempfile.mkdtemp(prefix="ponder-overhead-keys-")) / "keys.yaml"
    entry = {"name": "bench", "sha256": hash_key(key), **KEY_LIMITS}
    path.write_text(yaml.safe_dump({"keys": [entry]}))
    cfg.auth.api_keys_file = str(path)
    return key


async def routed_request(
    client: httpx.AsyncClient, model: str, question: str, rounds: int, max_tokens: int
) -> tuple[float, dict]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        # min_rounds 1, a threshold never reached and no other exit criterion (the high tier's table
        # entry has none; its strategy is ToT, so ask for a chain): rounds 1..R-1 are exits the exit
        # rule could have taken. Not `critical`: its answers are held for review (HTTP 202).
        # No KV store: the direct path has none, and its saves are the store's cost, not routing's
        # (bench kv measures those).
        "reasoning": {
            "tier": "high",
            "strategy": "cot",
            "kv_store": False,
            "min_rounds": 1,
            "max_rounds": rounds,
            "confidence_threshold": 1.0,
        },
    }
    start = time.perf_counter()
    resp = await client.post("/v1/chat/completions", json=body)
    elapsed = (time.perf_counter() - start) * 1000.0
    resp.raise_for_status()
    data = resp.json()
    got = [r["decided_by"] for r in data["reasoning"]["rounds"]]
    if got != ["router"] * rounds:
        raise RuntimeError(f"expected {rounds} rounds decided by the router under the granted plan: {got}")
    return elapsed, data


async def measure(cfg: AppConfig, url: str, args: argparse.Namespace, key: str | None = None) -> dict:
    from ray import serve

    from services.loop.tokenizer import HfTokenizer

    worker = serve.get_deployment_handle("ReasoningWorker", cfg.app_name)
    tokenizer = HfTokenizer(cfg.engine.model_path or "")
    direct, routed, router_rounds = [], [], []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120.0, headers=headers) as client:
        for i in range(-2, args.requests):  # two warm-up pairs, not counted
            qd, qr = (
                f"Question {i + 1000}a: what is {i} + 3?",
                f"Question {i + 1000}b: what is {i} + 3?",
            )
            d = await direct_request(worker, tokenizer, qd, args.rounds, args.max_tokens)
            r, data = await routed_request(client, cfg.engine.model, qr, args.rounds, args.max_tokens)
            if i >= 0:
                direct.append(d / args.rounds)
                routed.append(r / args.rounds)
                router_rounds.extend(x["latency_ms"] for x in data["reasoning"]["rounds"])
            if i >= 0 and (i + 1) % 10 == 0:
                print(f"  {i + 1}/{args.requests} request pairs", flush=True)
    return summarize(direct, routed, router_rounds, args)


def summarize(
    direct: list[float], routed: list[float], router_rounds: list[float], args: argparse.Namespace
) -> dict:
    out = {
        "added_ms_p50": percentile(routed, 50) - percentile(direct, 50),
        "added_ms_p99": percentile(routed, 99) - percentile(direct, 99),
        "direct_round_ms_p50": percentile(direct, 50),
        "direct_round_ms_p99": percentile(direct, 99),
        "routed_round_ms_p50": percentile(routed, 50),
        "routed_round_ms_p99": percentile(routed, 99),
        "router_measured_round_ms_p50": percentile(router_rounds, 50),
        "direct_round_ms_mean": statistics.fmean(direct),
        "routed_round_ms_mean": statistics.fmean(routed),
        "requests": args.requests,
        "rounds_per_request": args.rounds,
        "tokens_per_round": args.max_tokens,
        "model": args.model,
    }
    return out


def print_table(res: dict) -> None:
    rows = [
        ("direct worker handle", res["direct_round_ms_p50"], res["direct_round_ms_p99"]),
        ("router + depth control (HTTP)", res["routed_round_ms_p50"], res["routed_round_ms_p99"]),
        ("added per round", res["added_ms_p50"], res["added_ms_p99"]),
    ]
    print(
        f"\nper-round time, {res['requests']} requests x {res['rounds_per_request']} rounds, "
        f"{res['tokens_per_round']} tokens/round, model {res['model']}"
    )
    print(f"{'path':32} {'p50 ms':>10} {'p99 ms':>10}")
    for name, p50, p99 in rows:
        print(f"{name:32} {p50:10.2f} {p99:10.2f}")


def run_once(args: argparse.Namespace, keys: bool) -> dict:
    from cluster.local import running

    cfg = bench_config(args)
    key = with_key(cfg) if keys else None
    with running(cfg, progress=lambda m: print(m, flush=True)) as url:
        res = asyncio.run(measure(cfg, url, args, key))
    res["api_keys"] = {"limits": KEY_LIMITS} if keys else None
    print_table(res)
    return res


def abba(pairs: int) -> list[bool]:
    """Which runs configure keys: ABBA... so that a drift of the machine's load cancels out."""
    return [k for i in range(pairs) for k in ((False, True) if i % 2 == 0 else (True, False))]


def main(args: argparse.Namespace) -> int:
    if not args.keys:
        res = run_once(args, keys=False)
    else:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        order = abba(max(1, args.pairs))
        for keys in order:
            print(
                f"\ncluster {'with an API key and its limits' if keys else 'without API keys'}:", flush=True
            )
            runs[keys].append(run_once(args, keys=keys))
        without = statistics.fmean(r["added_ms_p50"] for r in runs[False])
        with_keys = statistics.fmean(r["added_ms_p50"] for r in runs[True])
        res = {
            **runs[False][0],
            "with_keys": runs[True][0],
            "order": ["keys" if k else "no keys" for k in order],
            "added_ms_p50_runs": {
                "without_keys": [r["added_ms_p50"] for r in runs[False]],
                "with_keys": [r["added_ms_p50"] for r in runs[True]],
            },
            "keys_added_ms_p50": with_keys - without,
        }
        print(
            f"\nadded per round, p50 (mean of {len(runs[False])} cluster(s) each): {without:.2f} ms without "
            f"keys, {with_keys:.2f} ms with a key and its limits ({res['keys_added_ms_p50']:+.2f} ms)"
        )
    if args.json_path:
        print(f"wrote {write_json(args.json_path, res)}")
    return 0
