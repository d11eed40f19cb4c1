"""`ponder bench kv`: the KV store's numbers (issue 4).

Measured now, in one process, against a local memcpy of the same bytes in the same run:
- codec_vs_memcpy: encode + decode throughput of real-sized store chunks (64 tokens, the CPU
  default: 2 of vLLM's 32-token CPU blocks, bf16, SmolLM2's 30 layers x 3 KV heads x 64), digests
  by two threads, over numpy memcpy throughput;
- store_waste_fraction: bytes of the occupied slots of a RAM pool filled with encoded chunks that
  hold no KV (header area, rounding);
- ram_put_get_vs_memcpy: a shard's put + get of those chunks over memcpy.
Between two processes (a shard in a Ray actor, this driver through kvstore/transport/client.py):
- nixl_vs_memcpy: NIXL READ bandwidth of batches of 4 MiB and more out of the shard's RAM pool, one
  contiguous span and as the encoded blocks' scattered slot spans, over a local numpy memcpy of the
  same spans measured in the same run (best of N after warm-up); the headline is the worst ratio of
  those, `nixl_vs_memcpy_by_size` has every one (and `client.get`, pins and copies included).
  Null with the reason when NIXL cannot be imported.
With real engines (bench/kv_serve.py; skipped with --no-serve, then null with the reason):
- restore_vs_recompute_speedup_2k: time to first token of a round whose 2,048-token prefix is loaded
  from a shard (over NIXL) vs recomputed, one CPU vLLM engine with Ponder's connector;
- prefix_reuse_fraction: reused prompt tokens (local prefix cache + store) over the prefix shared
  with the previous round, rounds after the first of served multi-round sessions on 2 workers;
- serving_throughput_store_on_vs_off: completion tokens/s of a served multi-round workload with
  the store on over the same with it off.
The worker-side data path alone, per context length and on a GPU too: `ponder bench kv-path`.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from bench import write_json
from kvstore.codec import BlockHeader, decode, encode
from kvstore.digest import Hasher
from kvstore.shard.pool import RamPool, slot_bytes_for, waste_fraction
from kvstore.shard.shard import BlockMeta, Shard, ShardConfig

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS, CHUNK_BLOCKS = 30, 3, 64, 32, 2  # SmolLM2-135M on CPU
SHAPE = (LAYERS, CHUNK_BLOCKS, KV_HEADS, BLOCK_TOKENS, 2 * HEAD_DIM)  # layer-major, as the connector
MODEL, LAYOUT = "smollm2-135m-instruct", f"layer-major/bd0:{list(SHAPE)}"
SKIPPED = {
    "restore_vs_recompute_speedup_2k": "skipped (--no-serve): starts a vLLM engine",
    "restore_vs_recompute_speedup_2k_ray": "skipped (--no-serve): starts a vLLM engine",
    "prefix_reuse_fraction": "skipped (--no-serve): serves the app on a local cluster",
    "serving_throughput_store_on_vs_off": "skipped (--no-serve): serves the app on a local cluster",
}
MiB = 1 << 20


COMMAND = ("kv", "KV store codec/slot/shard throughput against memcpy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--blocks", type=int, default=64, help="chunks per measurement (each ~1.5 MB)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions; the best is kept")
    p.add_argument(
        "--nixl-sizes", default="4,16,64", help="NIXL READ batch sizes in MiB (comma-separated; '' = skip)"
    )
    p.add_argument("--nixl-repeats", type=int, default=10, help="NIXL/memcpy repetitions; the best is kept")
    p.add_argument("--no-serve", action="store_true", help="skip the engine and served-session measurements")
    p.add_argument("--trials", type=int, default=5, help="restore-vs-recompute trials (2k-token prefixes)")
    p.add_argument("--sessions", type=int, default=6, help="served sessions per prefix-reuse mode")
    p.add_argument(
        "--throughput-repeats", type=int, default=3, help="store off/on serving runs each (0 = skip)"
    )
    p.add_argument("--throughput-sessions", type=int, default=9, help="sessions per throughput run")


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _nixl_missing() -> str | None:
    from kvstore.transport.factory import nixl_missing

    return nixl_missing()


def _spans_for(pins: list[tuple[str, int, int]], size: int) -> list[tuple[int, int, int]]:
    """Leading block spans (remote offset, packed local offset, length) covering `size` bytes."""
    spans, local = [], 0
    for _, remote, n in pins:
        if local >= size:
            break
        spans.append((remote, local, n))
        local += n
    return spans


def _time_pair(read, copy, repeats: int) -> tuple[float, float]:
    for _ in range(2):  # warm-up: UCX's rkeys and the pages of both sides
        read()
        copy()
    return _best(read, repeats), _best(copy, repeats)


def _nixl_rows(shard, client, sizes: list[int], encoded: list[bytes], repeats: int) -> list[dict]:
    import ray

    peer = client.peer(shard)
    if peer is None:
        raise RuntimeError("the shard offered no NIXL path")
    hashes = [f"nixl-{i}" for i in range(len(encoded))]
    pins = ray.get(shard.pin_for_read.remote(hashes))
    src = np.random.default_rng(1).integers(0, 256, client.staging.size + max(sizes), dtype=np.uint8)
    dst = client.staging  # the READs land here too: same destination memory for both
    rows = []
    for size in sizes:
        for layout, spans in (("contiguous", [(0, 0, size)]), ("blocks", _spans_for(pins, size))):
            nbytes = sum(n for _, _, n in spans)

            def read(spans=spans) -> None:
                client.transport.read(peer, spans, timeout=30.0)

            def copy(spans=spans) -> None:
                for remote, local, n in spans:
                    dst[local : local + n] = src[remote : remote + n]

            t_nixl, t_mem = _time_pair(read, copy, repeats)
            rows.append(_row(layout, size, len(spans), nbytes, t_nixl, t_mem))
    ray.get(shard.finish_read.remote([h for h, _, _ in pins], True))
    # End to end, as a loader sees it: pin + READ + unpin + copies out (a Ray round trip included).
    size = max(sizes)
    k = len(_spans_for(pins, size))
    t_get = _best(lambda: client.get(shard, hashes[:k]), repeats)
    blocks = rows[-1]
    rows.append(_row("client.get", size, k, blocks["bytes"], t_get, blocks["memcpy_s"]))
    return rows


def _row(layout: str, size: int, spans: int, nbytes: int, t_nixl: float, t_mem: float) -> dict:
    return {
        "layout": layout,
        "size_mib": size // MiB,
        "spans": spans,
        "bytes": nbytes,
        "nixl_gbps": round(nbytes / t_nixl / 1e9, 3),
        "memcpy_gbps": round(nbytes / t_mem / 1e9, 3),
        "ratio": round(t_mem / t_nixl, 4),
        "nixl_s": t_nixl,
        "memcpy_s": t_mem,
    }


def measure_nixl(sizes_mib: list[int], encoded: list[bytes], slot: int, repeats: int) -> dict:
    """NIXL READ between a shard actor and this process over memcpy; {"nixl_vs_memcpy": None, ...} if
    NIXL is missing."""
    why = _nixl_missing()
    if why is None and not sizes_mib:
        why = "skipped (--nixl-sizes '')"
    if why is not None:
        return {"nixl_vs_memcpy": None, "nixl_vs_memcpy_by_size": None, "why": why}
    import ray

    from kvstore.transport.client import NixlClient

    sizes = [m * MiB for m in sizes_mib]
    per_block = len(encoded[0])
    nblocks = math.ceil(max(sizes) / per_block) + 1
    blobs = [encoded[i % len(encoded)] for i in range(nblocks)]  # same bytes, other hashes: fine here
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    size = 2 * nblocks * per_block  # reads and writes each have half of the staging buffer
    client = NixlClient("bench-kv", staging_bytes=size, max_staging_bytes=size)
    try:
        shard = ray.remote(Shard).options(num_cpus=0).remote(ShardConfig(ram_slots=nblocks, slot_bytes=slot))
        metas = [BlockMeta(f"nixl-{i}", "nixl", 0) for i in range(nblocks)]
        if client.put(shard, metas, blobs) != nblocks or client.stats["nixl_puts"] != 1:
            raise RuntimeError(f"filling the shard over NIXL WRITE failed ({client.stats})")
        rows = _nixl_rows(shard, client, sizes, blobs, repeats)
        ray.kill(shard)
    finally:
        client.close()
        if started:
            ray.shutdown()
    headline = min(r["ratio"] for r in rows if r["layout"] != "client.get" and r["size_mib"] >= 4)
    return {"nixl_vs_memcpy": headline, "nixl_vs_memcpy_by_size": rows, "why": None}


def measure(blocks: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    payloads = [rng.standard_normal(SHAPE).astype(np.float16) for _ in range(blocks)]  # bf16-sized
    raw = [p.tobytes() for p in payloads]
    nbytes = sum(len(r) for r in raw)
    headers = [
        BlockHeader(MODEL, "bfloat16", LAYOUT, SHAPE, i.to_bytes(16, "big"), "s", i // 8, "")
        for i in range(blocks)
    ]
    dst = np.empty(nbytes, dtype=np.uint8)

    def memcpy() -> None:
        o = 0
        for r in payloads:
            n = r.nbytes
            dst[o : o + n] = r.view(np.uint8).reshape(-1)
            o += n

    hasher = Hasher(2)
    encoded = [encode(h, r, hasher) for h, r in zip(headers, raw, strict=True)]

    def codec() -> None:
        for h, r in zip(headers, raw, strict=True):
            decode(encode(h, r, hasher), expect_model=MODEL, expect_layout=LAYOUT, hasher=hasher)

    slot = slot_bytes_for(len(raw[0]))
    pool = RamPool(blocks, slot)
    for i, e in enumerate(encoded):
        pool.write(i, e)
    waste = waste_fraction([len(r) for r in raw], slot)
    shard = Shard(ShardConfig(ram_slots=blocks, slot_bytes=slot))
    metas = [BlockMeta(f"h{i}", "s", i // 8) for i in range(blocks)]

    def put_get() -> None:
        shard.finish_session("s")
        shard.put(metas, encoded)
        shard.get([m.hash for m in metas])

    t_mem, t_codec, t_store = (_best(f, repeats) for f in (memcpy, codec, put_get))
    gbps = lambda t: nbytes / t / 1e9  # noqa: E731
    return {
        "blocks": blocks,
        "block_tokens": BLOCK_TOKENS * CHUNK_BLOCKS,
        "block_bytes": len(raw[0]),
        "slot_bytes": slot,
        "memcpy_gbps": round(gbps(t_mem), 3),
        "codec_gbps": round(gbps(t_codec), 3),
        "ram_put_get_gbps": round(gbps(t_store), 3),
        "codec_vs_memcpy": round(t_mem / t_codec, 4),
        "ram_put_get_vs_memcpy": round(t_mem / t_store, 4),
        "store_waste_fraction": round(waste, 5),
        "not_measured": {},
        "_encoded": encoded,
        "_slot": slot,
    }


def _print_nixl(res: dict) -> None:
    if res["nixl_vs_memcpy"] is None:
        print(f"nixl_vs_memcpy: not measured ({res['not_measured']['nixl_vs_memcpy']})")
        return
    print("NIXL READ shard actor -> this process vs local memcpy of the same spans (best of N):")
    print(f"{'layout':12} {'MiB':>4} {'spans':>6} {'NIXL GB/s':>10} {'memcpy GB/s':>12} {'ratio':>7}")
    for r in res["nixl_vs_memcpy_by_size"]:
        print(
            f"{r['layout']:12} {r['size_mib']:4d} {r['spans']:6d} {r['nixl_gbps']:10.3f} "
            f"{r['memcpy_gbps']:12.3f} {r['ratio']:7.3f}"
        )
    print(f"nixl_vs_memcpy (worst READ ratio, >= 4 MiB) {res['nixl_vs_memcpy']:.3f}")


def _print_serve(res: dict) -> None:
    print(
        f"restore_vs_recompute_speedup_2k {res['restore_vs_recompute_speedup_2k']:.2f} over NIXL "
        f"(TTFT {res['restore_ttft_ms_median']:.0f} ms loaded vs {res['recompute_ttft_ms_median']:.0f} ms "
        f"recomputed; save request {res['save_request_ms_median']:.0f} ms)"
    )
    ray = res["restore_over_ray"]
    print(
        f"restore_vs_recompute_speedup_2k_ray {res['restore_vs_recompute_speedup_2k_ray']:.2f} "
        f"over Ray bytes (TTFT {ray['restore_ttft_ms_median']:.0f} ms vs "
        f"{ray['recompute_ttft_ms_median']:.0f} ms)"
    )
    print(f"{'prefix reuse':14} {'fraction':>9} {'local':>7} {'store':>7} {'switches':>9}")
    for mode, r in res["prefix_reuse"].items():
        print(
            f"{mode:14} {r['prefix_reuse_fraction']:9.4f} {r['from_local_cache']:7.4f} "
            f"{r['from_store']:7.4f} {r['worker_switches']:4d}/{r['later_rounds']}"
        )
    print(
        f"compression (zlib level 1) of real KV blocks: ratio {res['zlib1_ratio']}, {res['zlib1_gbps']} GB/s"
    )
    if res.get("serving_throughput_store_on_vs_off") is not None:
        print(
            f"serving_throughput_store_on_vs_off {res['serving_throughput_store_on_vs_off']:.3f} "
            f"(tokens/s {res['serving_tokens_per_s']})"
        )


def main(args: argparse.Namespace) -> int:
    res = measure(args.blocks, args.repeats)
    sizes = [int(x) for x in args.nixl_sizes.split(",") if x.strip()]
    nixl = measure_nixl(sizes, res.pop("_encoded"), res.pop("_slot"), args.nixl_repeats)
    why = nixl.pop("why")
    res.update(nixl)
    if why is not None:
        res["not_measured"]["nixl_vs_memcpy"] = why
    print(
        f"KV store: {res['blocks']} chunks of {res['block_tokens']} tokens, {res['block_bytes']} bytes "
        f"(slots of {res['slot_bytes']})"
    )
    print(f"{'measure':28} {'GB/s':>8} {'vs memcpy':>10}")
    print(f"{'memcpy':28} {res['memcpy_gbps']:8.3f} {1.0:10.3f}")
    print(f"{'codec encode+decode':28} {res['codec_gbps']:8.3f} {res['codec_vs_memcpy']:10.3f}")
    print(f"{'shard put+get (RAM)':28} {res['ram_put_get_gbps']:8.3f} {res['ram_put_get_vs_memcpy']:10.3f}")
    print(f"store_waste_fraction {res['store_waste_fraction']:.4f}")
    _print_nixl(res)
    if args.no_serve:
        res.update(dict.fromkeys(SKIPPED))
        res["not_measured"].update(SKIPPED)
    else:
        from bench.kv_serve import measure_restore, measure_reuse, measure_throughput

        res.update(measure_restore(args.trials))
        over_ray = measure_restore(args.trials, transport="ray")
        res["restore_vs_recompute_speedup_2k_ray"] = over_ray["restore_vs_recompute_speedup_2k"]
        res["restore_over_ray"] = {
            k: v for k, v in over_ray.items() if not k.startswith(("zlib", "compr", "memcpy"))
        }
        res.update(measure_reuse(sessions=args.sessions))
        if args.throughput_repeats:
            res.update(measure_throughput(sessions=args.throughput_sessions, repeats=args.throughput_repeats))
        else:
            why = "skipped (--throughput-repeats 0)"
            res["serving_throughput_store_on_vs_off"] = None
            res["not_measured"]["serving_throughput_store_on_vs_off"] = why
        _print_serve(res)
    for key, why in res["not_measured"].items():
        print(f"{key}: not measured ({why})")
    if args.json_path:
        print(f"wrote {write_json(args.json_path, res)}")
    return 0
