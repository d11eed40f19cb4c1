"""The engine's store (`RayStore`, as the connector uses it) moving block bytes to and from real shard
actors over NIXL (one-sided READ/WRITE), and over Ray bytes when asked to. A local Ray cluster; the
client is this test process. (kvstore/transport/client.py's own tests: test_kv_nixl_shard.py.)"""

from __future__ import annotations

import random

import pytest
import ray

from kvstore.connector.config import KvConnectorConfig
from kvstore.connector.engine_store import RayStore
from kvstore.shard.client import start_shards
from kvstore.shard.pool import slot_bytes_for
from kvstore.shard.shard import BlockMeta, ShardConfig

pytestmark = pytest.mark.engine

BLOCK = 200_000


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="ponder", log_to_driver=False)
    try:
        node = ray.get_runtime_context().get_node_id()
        (shard,) = start_shards(
            ShardConfig(ram_slots=64, slot_bytes=slot_bytes_for(BLOCK)), [node], "ponder"
        ).values()
        ray.get(shard.stats.remote())
        yield shard
    finally:
        ray.shutdown()


def blocks(seed: int, n: int) -> tuple[list[BlockMeta], list[bytes]]:
    rng = random.Random(seed)
    metas = [BlockMeta(f"s{seed}-b{i}", f"s{seed}", 0) for i in range(n)]
    return metas, [rng.randbytes(BLOCK - rng.randrange(1000)) for _ in range(n)]


def store(transport: str, staging: int = 64 << 20) -> RayStore:
    cfg = KvConnectorConfig(model="m", transport=transport, staging_bytes=staging)
    return RayStore(cfg)


def test_put_and_get_move_the_bytes_one_sided(cluster):
    s = store("nixl")
    assert s.nixl is not None, "NIXL must import on this machine (nixl-cu12 is pinned)"
    metas, blobs = blocks(1, 12)
    assert s.put("s1", metas, blobs) == 12
    assert s.nixl.stats["nixl_puts"] == 1 and s.nixl.stats["bytes_puts"] == 0
    hashes = [m.hash for m in metas]
    assert s.lookup("s1", hashes) == 12
    assert s.get("s1", hashes) == blobs
    assert s.nixl.stats["nixl_gets"] == 1 and s.nixl.stats["fallbacks"] == 0
    assert s.put("s1", metas, blobs) == 0  # content-addressed: nothing new, nothing sent
    st = ray.get(cluster.stats.remote())
    assert st["pinned"] == 0  # every read unpinned its blocks


def test_batches_larger_than_the_staging_buffer_still_go_one_sided(cluster):
    s = store("nixl", staging=1 << 20)  # 16 blocks of ~200 KB do not fit 1 MiB: the buffer grows
    metas, blobs = blocks(2, 16)
    assert s.put("s2", metas, blobs) == 16
    assert s.get("s2", [m.hash for m in metas]) == blobs
    assert s.nixl.stats["nixl_bytes"] == 2 * sum(len(b) for b in blobs)


def test_the_bytes_path_reads_what_nixl_wrote_and_back(cluster):
    one_sided, over_ray = store("nixl"), store("ray")
    assert over_ray.nixl is None
    metas, blobs = blocks(3, 4)
    assert over_ray.put("s3", metas, blobs) == 4
    assert one_sided.get("s3", [m.hash for m in metas]) == blobs
    metas, blobs = blocks(4, 4)
    assert one_sided.put("s4", metas, blobs) == 4
    assert over_ray.get("s4", [m.hash for m in metas]) == blobs


def test_a_reservation_never_committed_is_reclaimed(cluster):
    metas, blobs = blocks(5, 2)
    places = ray.get(cluster.reserve_for_write.remote(metas, [len(b) for b in blobs]))
    assert all(p is not None for p in places)
    assert ray.get(cluster.lookup.remote([m.hash for m in metas])) == 0  # pending: not readable
    assert ray.get(cluster.sweep.remote(1e12)) >= 2  # the writer died: past its lease, slots come back
    before = ray.get(cluster.stats.remote())["slots_used"]["ram"]
    s = store("nixl")
    assert s.put("s5", metas, blobs) == 2  # the same blocks can be written afresh
    assert ray.get(cluster.stats.remote())["slots_used"]["ram"] == before + 2
