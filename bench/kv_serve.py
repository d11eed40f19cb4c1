"""The KV store measured with real engines: restore vs recompute, and prefix reuse in served sessions.

- `restore_vs_recompute_speedup_2k`: one CPU vLLM engine with Ponder's connector and one real shard
  actor on a local Ray cluster. Per trial a fresh 2048-token prefix is saved (one request), the
  engine's local prefix cache is emptied, then the next round (prefix + 32 new tokens, 1 output
  token) runs twice: with the prefix loaded from the store, and recomputed (untagged). Medians of
  time-to-first-token; each restore is checked to have loaded the whole 2048-token prefix.
- `prefix_reuse_fraction`: the app served on a local cluster with 2 workers; multi-round sessions
  over a shared ~600-token document, several in flight. For every round after the first, reused =
  local prefix-cache tokens + store-loaded tokens, over the prefix it shares with the previous
  round (that round's prompt + output). Measured with session affinity (the default), with every
  round forced onto the other worker, and forced with vLLM's local prefix cache off (all reuse
  comes from the store).
- `serving_throughput_store_on_vs_off`: the same multi-round workload (the default app: one worker,
  session affinity, 3 sessions in flight) served with the store off and on, alternately, three
  times each: completion tokens per second of wall time, store on over store off (the ratio of the
  medians). Every round saves its chunks with the store on: this is what the saves cost a serving
  engine. Sampled outputs differ between runs (batching changes bf16 numerics), so token counts
  differ too; the rate is what is compared.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
import statistics
import tempfile
import time
from typing import Any

from cluster.models import SMALL_MODEL, ensure_model

BLOCK = 32
CHUNK = 256  # the connector's default store unit
PREFIX = 2048
WORDS = [
    "river",
    "port",
    "ferry",
    "market",
    "town",
    "stone",
    "bridge",
    "harbour",
    "merchant",
    "grain",
    "wool",
    "cloth",
    "salt",
    "iron",
    "timber",
    "guild",
    "charter",
    "mayor",
    "council",
    "tax",
    "toll",
    "road",
    "canal",
    "mill",
    "forge",
    "quay",
    "warehouse",
    "ledger",
    "coin",
    "silver",
    "season",
    "flood",
    "drought",
    "harvest",
    "winter",
    "spring",
    "trade",
    "route",
    "caravan",
    "ship",
    "crew",
    "captain",
    "pilot",
    "tide",
]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _prefix_ids(tok: Any, rng: random.Random) -> list[int]:
    ids: list[int] = []
    while len(ids) < PREFIX:
        ids += tok(_text(rng, 400), add_special_tokens=False)["input_ids"]
    return ids[:PREFIX]


async def _restore(trials: int, progress, transport: str = "nixl", ray_metrics: bool = True) -> dict:
    import ray
    from transformers import AutoTokenizer

    from kvstore.chain import block_hashes, model_key
    from kvstore.connector.config import KvConnectorConfig
    from kvstore.shard.client import start_shards
    from kvstore.shard.pool import slot_bytes_for
    from kvstore.shard.shard import ShardConfig
    from kvstore.shard.sizing import block_payload_bytes
    from services.worker.engine import SamplingSpec
    from services.worker.engine_config import EngineConfig
    from services.worker.vllm_engine import VllmEngine

    path = str(ensure_model(SMALL_MODEL))
    slot = slot_bytes_for(block_payload_bytes(path, CHUNK))
    kv_namespace = KvConnectorConfig.model_fields["namespace"].default  # where the connector looks
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, namespace=kv_namespace, log_to_driver=False
    )
    engine = None
    try:
        (shard,) = start_shards(
            ShardConfig(ram_slots=(PREFIX // CHUNK + 2) * (trials + 1), slot_bytes=slot),
            [ray.get_runtime_context().get_node_id()],
            kv_namespace,
        ).values()
        ray.get(shard.stats.remote())  # the shard is up before the engine looks for it
        kv = KvConnectorConfig(
            model=SMALL_MODEL,
            ray_address=ray.get_runtime_context().gcs_address,
            transport=transport,
            chunk_tokens=CHUNK,
        )
        cfg = EngineConfig(
            model=SMALL_MODEL,
            model_path=path,
            max_model_len=4096,
            kv_cache_memory_bytes=256 << 20,
            block_size=BLOCK,
            kv_connector=kv,
            ray_metrics=ray_metrics,
        )
        engine = VllmEngine(cfg, path)
        await engine.start()
        llm = engine._require()
        tok = AutoTokenizer.from_pretrained(path)
        rng = random.Random(11)

        async def timed(ids, tags):
            spec = SamplingSpec(max_tokens=1, temperature=0.0, kv_tags=tags)
            t0 = time.perf_counter()
            r = await engine.generate(f"b{time.perf_counter_ns()}", ids, spec)
            return time.perf_counter() - t0, r

        async def cold() -> None:
            """Empty vLLM's prefix cache; a request whose saves are still being copied holds its
            blocks for a few engine steps more (the engine keeps stepping until they are freed)."""
            for _ in range(2000):
                if await llm.reset_prefix_cache() is not False:
                    return
                await asyncio.sleep(0.005)
            raise RuntimeError("vLLM's prefix cache could not be reset: blocks still held")

        await timed(_prefix_ids(tok, rng)[:256], None)  # warm-up
        restore, recompute, save, floor = [], [], [], []
        for i in range(trials):
            prefix = _prefix_ids(tok, rng)
            nxt = prefix + tok(_text(rng, 20), add_special_tokens=False)["input_ids"][:32]
            t_save, _ = await timed(prefix + [13], (f"trial{i}", 0, ""))
            await cold()
            t_load, r = await timed(nxt, (f"trial{i}", 1, ""))
            if r.kv_loaded_tokens != PREFIX:
                raise RuntimeError(f"trial {i}: loaded {r.kv_loaded_tokens} of {PREFIX} prefix tokens")
            # The floor: the same round with its prefix already in vLLM's own cache (the restored
            # blocks are there now), other new tokens: what no load can beat.
            alt = prefix + tok(_text(rng, 20), add_special_tokens=False)["input_ids"][:32]
            t_floor, r3 = await timed(alt, None)
            if r3.cached_tokens < PREFIX:
                raise RuntimeError(f"trial {i}: the floor round found {r3.cached_tokens} cached tokens")
            await cold()
            t_re, r2 = await timed(nxt, None)
            if r2.kv_loaded_tokens or r2.cached_tokens:
                raise RuntimeError(f"trial {i}: the recompute reused {r2.cached_tokens} tokens")
            await cold()
            restore.append(t_load)
            floor.append(t_floor)
            recompute.append(t_re)
            save.append(t_save)
            progress(
                f"  trial {i}: save {t_save * 1e3:.0f} ms, restore {t_load * 1e3:.0f} ms, "
                f"cached-prefix floor {t_floor * 1e3:.0f} ms, recompute {t_re * 1e3:.0f} ms"
            )
        med = statistics.median
        sample = ray.get(
            shard.get.remote(block_hashes(model_key(SMALL_MODEL, "bfloat16", BLOCK, CHUNK), nxt, CHUNK))
        )
        return {
            **compression_of(sample),
            "restore_vs_recompute_speedup_2k": round(med(recompute) / med(restore), 2),
            "restore_ttft_ms_median": round(med(restore) * 1e3, 1),
            "recompute_ttft_ms_median": round(med(recompute) * 1e3, 1),
            "cached_prefix_ttft_ms_median": round(med(floor) * 1e3, 1),
            "recompute_vs_cached_prefix": round(med(recompute) / med(floor), 2),
            "save_request_ms_median": round(med(save) * 1e3, 1),
            "restore_trials": trials,
            "transport": transport,
            "block_tokens": BLOCK,
            "chunk_tokens": CHUNK,
            "prefix_tokens": PREFIX,
        }
    finally:
        if engine is not None:
            await engine.shutdown()
        ray.shutdown()


def compression_of(blocks: list[bytes]) -> dict:
    """Does compressing real KV blocks pay? zlib level 1 (the fastest) against a plain copy."""
    import zlib

    import numpy as np

    raw = b"".join(blocks)
    t0 = time.perf_counter()
    packed = zlib.compress(raw, 1)
    t_zip = time.perf_counter() - t0
    src = np.frombuffer(raw, dtype=np.uint8)
    t0 = time.perf_counter()
    src.copy()
    t_copy = time.perf_counter() - t0
    return {
        "compression_sample_bytes": len(raw),
        "zlib1_ratio": round(len(packed) / len(raw), 4),
        "zlib1_gbps": round(len(raw) / t_zip / 1e9, 3),
        "memcpy_gbps_sample": round(len(raw) / t_copy / 1e9, 3),
    }


def measure_restore(trials: int = 5, progress=print, transport: str = "nixl") -> dict:
    progress(f"restore vs recompute over {transport}: {trials} trials of a {PREFIX}-token prefix")
    return asyncio.run(_restore(trials, progress, transport))


QUESTIONS = [
    "Which goods passed through the port most often, according to the record?",
    "What happened to the bridge during the floods?",
    "Who collected the tolls, and on what?",
    "How did the guild charter change trade?",
    "Which season brought the most ships?",
    "What did the council build after the drought?",
    "Name two routes the caravans used.",
    "What was stored in the warehouses by the quay?",
]


def _sessions(url: str, model: str, doc: str, n: int, rounds: int, concurrency: int) -> list[list[dict]]:
    import httpx

    def one(i: int) -> list[dict]:
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": doc},
                {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
            ],
            "max_tokens": 48,
            "temperature": 0.7,
            "seed": 100 + i,
            "reasoning": {"tier": "medium", "max_rounds": rounds, "min_rounds": rounds},
        }
        with httpx.Client(base_url=url, timeout=900) as c:
            r = c.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["reasoning"]["rounds"]

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def reuse_of(sessions: list[list[dict]]) -> dict:
    """Reused prefix tokens over shared prefix tokens, rounds after the first."""
    shared = local = loaded = switches = later = 0
    for rounds in sessions:
        for prev, cur in zip(rounds, rounds[1:], strict=False):
            shared += min(prev["prompt_tokens"] + prev["completion_tokens"], cur["prompt_tokens"])
            local += cur["kv_cached_tokens"]
            loaded += cur["kv_loaded_tokens"]
            switches += cur["worker"] != prev["worker"]
            later += 1
    return {
        "prefix_reuse_fraction": round((local + loaded) / shared, 4) if shared else None,
        "from_local_cache": round(local / shared, 4) if shared else None,
        "from_store": round(loaded / shared, 4) if shared else None,
        "worker_switches": switches,
        "later_rounds": later,
        "shared_prefix_tokens": shared,
    }


def measure_reuse(sessions: int = 6, rounds: int = 4, concurrency: int = 3, progress=print) -> dict:
    from cluster.local import running

    doc = "Harbour record. " + _text(random.Random(3), 420)
    out = {}
    modes = (("affinity", 4, True), ("spill", 0, True), ("store_only", 0, False))
    for mode, max_queue, local_cache in modes:
        cfg = serve_cfg(store=True, workers=2)
        cfg.engine.block_size = BLOCK
        cfg.engine.enable_prefix_caching = local_cache  # off: every reused token comes from the store
        cfg.kvstore.affinity_max_queue = max_queue
        progress(f"prefix reuse, {mode}: {sessions} sessions x {rounds} rounds, {concurrency} in flight")
        with running(cfg, progress=progress) as url:
            t0 = time.perf_counter()
            res = reuse_of(_sessions(url, cfg.engine.model, doc, sessions, rounds, concurrency))
            res["seconds"] = round(time.perf_counter() - t0, 1)
        progress(f"  {mode}: {res}")
        out[mode] = res
    return {
        "prefix_reuse_fraction": out["affinity"]["prefix_reuse_fraction"],
        "prefix_reuse_fraction_spill": out["spill"]["prefix_reuse_fraction"],
        "prefix_reuse_fraction_store_only": out["store_only"]["prefix_reuse_fraction"],
        "prefix_reuse": out,
    }


def serve_cfg(store: bool, workers: int = 1):
    """The default app as the served measurements run it: its own state folder (not the user's),
    a free port, no dashboard."""
    from cluster.local import free_port
    from services.config import DEFAULT_CONFIG, AppConfig

    cfg = AppConfig.load(DEFAULT_CONFIG)
    cfg.engine.model = SMALL_MODEL  # the store is measured, not the model: the small one
    cfg.engine.model_path = str(ensure_model(cfg.engine.model))
    cfg.engine.max_model_len = 4096
    cfg.engine.kv_cache_memory_bytes = 256 << 20
    cfg.worker.num_replicas = workers
    cfg.ray.dashboard = False
    cfg.ray.num_cpus = 4
    cfg.http.port = free_port()
    cfg.kvstore.enabled = store
    cfg.depth_control.state_dir = tempfile.mkdtemp(prefix="ponder-kv-bench-state-")
    return cfg


def measure_throughput(
    sessions: int = 9, rounds: int = 4, concurrency: int = 3, repeats: int = 3, progress=print
) -> dict:
    """Completion tokens/s of the same multi-round workload with the store off and on (alternating)."""
    from cluster.local import running

    doc = "Harbour record. " + _text(random.Random(3), 420)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for rep in range(repeats):
        for mode in ("off", "on"):
            cfg = serve_cfg(mode == "on")
            progress(f"throughput, store {mode} ({rep + 1}/{repeats}): {sessions} sessions x {rounds} rounds")
            with running(cfg, progress=lambda m: None) as url:
                _sessions(url, cfg.engine.model, doc, 1, 1, 1)  # warm-up: the engine's first steps
                t0 = time.perf_counter()
                done = _sessions(url, cfg.engine.model, doc, sessions, rounds, concurrency)
                wall = time.perf_counter() - t0
            tokens = sum(r["completion_tokens"] for s in done for r in s)
            runs[mode].append(tokens / wall)
            progress(f"  {tokens} tokens in {wall:.1f} s: {tokens / wall:.1f} tok/s")
    med = statistics.median
    return {
        "serving_throughput_store_on_vs_off": round(med(runs["on"]) / med(runs["off"]), 3),
        "serving_tokens_per_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
    }
