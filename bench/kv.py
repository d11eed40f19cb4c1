"""`ponder bench kv`: the KV store's numbers, as far as the store is built (issue 4, in progress).

Measured now, in one process, against a local memcpy of the same bytes in the same run:
- codec_vs_memcpy: encode + decode throughput of real-sized blocks (16 tokens, bf16, SmolLM2's
  30 layers x 3 KV heads x 64) over numpy memcpy throughput;
- store_waste_fraction: unused bytes of the occupied slots of a RAM pool filled with encoded blocks;
- ram_put_get_vs_memcpy: a shard's put + get of those blocks over memcpy.
Not measured yet (null in the JSON, with the reason): restore_vs_recompute_speedup_2k and
prefix_reuse_fraction need the vLLM KV connector; nixl_vs_memcpy needs the NIXL transport.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from kvstore.codec import BlockHeader, decode, encode
from kvstore.pool import RamPool, slot_bytes_for, waste_fraction
from kvstore.shard import BlockMeta, Shard, ShardConfig

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS = 30, 3, 64, 16  # SmolLM2-135M, vLLM's 16-token blocks
SHAPE = (LAYERS, 2, KV_HEADS, BLOCK_TOKENS, HEAD_DIM)
MODEL, LAYOUT = "smollm2-135m-instruct", "[layers,2,kv_heads,block,head_dim]"
NOT_YET = {
    "restore_vs_recompute_speedup_2k": "needs the vLLM KV connector (not built yet)",
    "prefix_reuse_fraction": "needs the vLLM KV connector and store routing (not built yet)",
    "nixl_vs_memcpy": "needs the NIXL transport (not built yet)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--blocks", type=int, default=256, help="blocks per measurement (each ~369 KB)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions; the best is kept")


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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

    encoded = [encode(h, r) for h, r in zip(headers, raw, strict=True)]

    def codec() -> None:
        for h, r in zip(headers, raw, strict=True):
            decode(encode(h, r), expect_model=MODEL, expect_layout=LAYOUT)

    slot = slot_bytes_for(len(raw[0]))
    pool = RamPool(blocks, slot)
    for i, e in enumerate(encoded):
        pool.write(i, e)
    waste = waste_fraction([len(e) + 4 for e in encoded], slot)
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
        "block_bytes": len(raw[0]),
        "slot_bytes": slot,
        "memcpy_gbps": round(gbps(t_mem), 3),
        "codec_gbps": round(gbps(t_codec), 3),
        "ram_put_get_gbps": round(gbps(t_store), 3),
        "codec_vs_memcpy": round(t_mem / t_codec, 4),
        "ram_put_get_vs_memcpy": round(t_mem / t_store, 4),
        "store_waste_fraction": round(waste, 5),
        **dict.fromkeys(NOT_YET),
        "not_measured": NOT_YET,
    }


def main(args: argparse.Namespace) -> int:
    res = measure(args.blocks, args.repeats)
    print(f"KV store: {res['blocks']} blocks of {res['block_bytes']} bytes (slots of {res['slot_bytes']})")
    print(f"{'measure':28} {'GB/s':>8} {'vs memcpy':>10}")
    print(f"{'memcpy':28} {res['memcpy_gbps']:8.3f} {1.0:10.3f}")
    print(f"{'codec encode+decode':28} {res['codec_gbps']:8.3f} {res['codec_vs_memcpy']:10.3f}")
    print(f"{'shard put+get (RAM)':28} {res['ram_put_get_gbps']:8.3f} {res['ram_put_get_vs_memcpy']:10.3f}")
    print(f"store_waste_fraction {res['store_waste_fraction']:.4f}")
    for key, why in NOT_YET.items():
        print(f"{key}: not measured ({why})")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0
