"""`nixl_vs_memcpy`: NIXL READ bandwidth from a shard actor's registered RAM pool into this process,
for batches of >= 4 MiB made of real-sized blocks, over numpy memcpy bandwidth of the same bytes in
the same run. Also the end-to-end block get (pin + READ + unpin) over NIXL vs the same get as bytes
through a Ray call."""

from __future__ import annotations

import random
import statistics
import time

import numpy as np

BLOCK = 737_280  # SmolLM2-135M, 32-token blocks, bf16: 30 layers x 3 KV heads x 32 x 128
SIZES_MIB = (4, 16, 64)


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_nixl(repeats: int = 7, progress=print) -> dict:
    import ray

    from kvstore.client import start_shards
    from kvstore.connector_config import KvConnectorConfig
    from kvstore.engine_store import RayStore
    from kvstore.pool import slot_bytes_for
    from kvstore.shard import BlockMeta, ShardConfig

    n_blocks = -(-max(SIZES_MIB) * (1 << 20) // BLOCK)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="ponder", log_to_driver=False)
    try:
        node = ray.get_runtime_context().get_node_id()
        cfg = ShardConfig(ram_slots=n_blocks + 8, slot_bytes=slot_bytes_for(BLOCK))
        (shard,) = start_shards(cfg, [node]).values()
        ray.get(shard.stats.remote())
        nixl = RayStore(KvConnectorConfig(model="bench", staging_bytes=(max(SIZES_MIB) + 8) << 20))
        ray_bytes = RayStore(KvConnectorConfig(model="bench", transport="ray"))
        if nixl.nixl is None:
            return {"nixl_vs_memcpy": None, "nixl_not_measured": "NIXL is not importable here"}
        rng = random.Random(0)
        metas = [BlockMeta(f"b{i}", "bench", 0) for i in range(n_blocks)]
        blobs = [rng.randbytes(BLOCK) for _ in range(n_blocks)]
        assert nixl.put("bench", metas, blobs) == n_blocks
        hashes = [m.hash for m in metas]
        path = nixl.nixl
        spans = ray.get(shard.pin_for_read.remote(hashes))  # pinned for the whole measurement
        peer = path.peers[nixl.ring.owner("bench")]
        rows = []
        for mib in SIZES_MIB:
            k = -(-mib * (1 << 20) // BLOCK)
            batch, local = [], 0
            for _, remote, n in spans[:k]:
                batch.append((remote, local, n))
                local += n
            src = np.frombuffer(b"".join(blobs[:k]), dtype=np.uint8)
            dst = np.empty_like(src)
            t_nixl = _best(lambda b=batch: path.t.read(peer, b, 10.0), repeats)
            t_copy = _best(lambda s=src, d=dst: np.copyto(d, s), repeats)
            rows.append(
                {
                    "batch_mib": round(local / (1 << 20), 1),
                    "blocks": k,
                    "nixl_gbps": round(local / t_nixl / 1e9, 3),
                    "memcpy_gbps": round(local / t_copy / 1e9, 3),
                    "ratio": round(t_copy / t_nixl, 3),
                }
            )
            progress(f"  {rows[-1]}")
        ray.get(shard.finish_read.remote(hashes, True))
        k = -(-16 * (1 << 20) // BLOCK)  # end to end: 16 MiB of blocks, as a connector would load them
        e2e_nixl = statistics.median(_timed(lambda: nixl.get("bench", hashes[:k])) for _ in range(repeats))
        e2e_ray = statistics.median(
            _timed(lambda: ray_bytes.get("bench", hashes[:k])) for _ in range(repeats)
        )
        assert nixl.get("bench", hashes[:k]) == blobs[:k] == ray_bytes.get("bench", hashes[:k])
        return {
            "nixl_vs_memcpy": min(r["ratio"] for r in rows),
            "nixl_batches": rows,
            "get_16mib_ms": {"nixl": round(e2e_nixl * 1e3, 2), "ray_bytes": round(e2e_ray * 1e3, 2)},
            "get_nixl_vs_ray_speedup": round(e2e_ray / e2e_nixl, 2),
        }
    finally:
        ray.shutdown()
