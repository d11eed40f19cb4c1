"""The store's one-sided data path between real processes: a Shard in a Ray actor registers its RAM pool
with NIXL, this process (kvstore/transport/client.py) WRITEs blocks into it and READs them back.

Checked: bytes equal both ways (and equal to what the shard's own Ray `get` returns), a staging buffer
that grows for a big batch, the bytes fallback (`transport: bytes`, a failing transfer), a dead shard
as a miss (never an exception), and an uncommitted reservation reclaimed by the shard's sweep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import ray

from kvstore.shard.pool import slot_bytes_for
from kvstore.shard.shard import BlockMeta, Shard, ShardConfig
from kvstore.transport.base import TransportError
from kvstore.transport.client import NixlClient
from kvstore.transport.factory import nixl_missing

pytestmark = pytest.mark.engine

BLOCK = 20_000
SLOT = slot_bytes_for(BLOCK)


def _nixl_missing() -> str | None:
    why = nixl_missing()  # found as the product finds it: nixl_cu13 (GPU images), then nixl_cu12
    return None if why is None else f"{why}; nixl-cu12 comes with requirements/cpu.txt"


needs_nixl = pytest.mark.skipif(_nixl_missing() is not None, reason=str(_nixl_missing()))


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _shard(transport: str = "nixl", slots: int = 32):
    cfg = ShardConfig(ram_slots=slots, slot_bytes=SLOT, transport=transport)
    return ray.remote(Shard).options(num_cpus=0).remote(cfg)


def _blocks(session: str, n: int, seed: int) -> tuple[list[BlockMeta], list[bytes]]:
    rng = random.Random(seed)
    metas = [BlockMeta(f"{session}-{i}", session, 0) for i in range(n)]
    return metas, [rng.randbytes(BLOCK - rng.randrange(0, 500)) for _ in range(n)]


def _kill(handle) -> None:
    """Kill an actor and return once Ray reports it dead (ray.kill only asks; calls may still run)."""
    ray.kill(handle, no_restart=True)
    for _ in range(1000):  # each round is a real call: no sleeping
        try:
            ray.get(handle.stats.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
    raise AssertionError("the actor outlived ray.kill")


@needs_nixl
def test_write_then_read_one_sided_bytes_equal() -> None:
    shard = _shard()
    client = NixlClient(staging_bytes=64 * 1024, max_staging_bytes=1 << 20)  # too small for the batch
    metas, blobs = _blocks("s", 12, seed=1)
    hashes = [m.hash for m in metas]
    assert client.put(shard, metas, blobs) == 12
    assert client.stats["nixl_puts"] == 1 and client.stats["bytes_puts"] == 0
    assert client.staging.size >= sum(map(len, blobs))  # it grew (and reconnected) for the batch
    assert ray.get(shard.get.remote(hashes)) == blobs  # what the WRITE left in the shard's slots
    assert client.put(shard, metas[:3], blobs[:3]) == 0  # already stored: nothing sent
    assert client.get(shard, hashes + ["absent"]) == blobs
    assert client.get(shard, hashes[5:8]) == blobs[5:8]
    assert client.stats["nixl_gets"] == 2 and client.stats["bytes_gets"] == 0
    assert client.stats["fallbacks"] == 0
    assert ray.get(shard.stats.remote())["pinned"] == 0  # finish_read arrived (in order, after the gets)
    small = NixlClient(staging_bytes=64 * 1024, max_staging_bytes=64 * 1024)
    assert small.get(shard, hashes) == blobs and small.stats["bytes_gets"] == 1  # does not fit: Ray bytes
    client.close()
    small.close()
    ray.kill(shard)


@needs_nixl
def test_bytes_transport_shard_falls_back_to_ray() -> None:
    shard = _shard(transport="ray")
    client = NixlClient()
    assert client.one_sided and client.peer(shard) is None
    metas, blobs = _blocks("b", 4, seed=2)
    assert client.put(shard, metas, blobs) == 4
    assert client.get(shard, [m.hash for m in metas]) == blobs
    assert client.stats["bytes_puts"] == 1 and client.stats["bytes_gets"] == 1
    assert client.stats["nixl_gets"] == client.stats["fallbacks"] == 0
    client.close()
    ray.kill(shard)


@needs_nixl
def test_failed_transfer_falls_back_and_dead_shard_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    shard = _shard()
    client = NixlClient(retry_s=0.0)  # after a failure, try one-sided again at the next call
    metas, blobs = _blocks("d", 4, seed=3)
    hashes = [m.hash for m in metas]
    assert client.put(shard, metas, blobs) == 4 and client.get(shard, hashes) == blobs

    def broken(*args, **kwargs):
        raise TransportError("injected: UCX lost the connection")

    monkeypatch.setattr(client.transport, "read", broken)
    assert client.get(shard, hashes) == blobs  # the same bytes, over Ray
    assert client.stats["fallbacks"] == 1 and client.stats["bytes_gets"] == 1
    assert ray.get(shard.stats.remote())["pinned"] == 0  # the pins of the failed READ were released
    monkeypatch.undo()  # the path recovers: reconnects (fresh metadata) and reads one-sided again

    assert client.get(shard, hashes) == blobs and client.stats["nixl_gets"] == 2
    _kill(shard)
    assert client.get(shard, hashes) == []  # a miss, no exception
    assert client.put(shard, metas, blobs) == 0
    client.close()


@needs_nixl
def test_uncommitted_reservation_is_reclaimed() -> None:
    shard = _shard(slots=2)
    metas, blobs = _blocks("r", 2, seed=4)
    places = ray.get(shard.reserve_for_write.remote(metas, [len(b) for b in blobs]))  # a writer that dies
    assert all(places) and ray.get(shard.stats.remote())["slots_used"] == {"ram": 2}
    lease = ShardConfig(slot_bytes=SLOT).lease_s
    assert ray.get(shard.sweep.remote(time.time() + lease + 1)) == 2  # the shard's clock is time.time
    assert ray.get(shard.stats.remote())["slots_used"] == {"ram": 0}
    client = NixlClient()
    assert client.put(shard, metas, blobs) == 2 and client.stats["nixl_puts"] == 1  # the slots are usable
    assert (
        ray.get(shard.commit_write.remote([m.hash for m in metas], True)) == 0
    )  # the dead writer's late commit
    assert client.get(shard, [m.hash for m in metas]) == blobs
    client.close()
    ray.kill(shard)
