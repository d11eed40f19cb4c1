"""A store shard with real RAM and disk pools (no Ray): bytes survive demotion, failures roll back."""

import random

from kvstore.shard.pool import slot_bytes_for
from kvstore.shard.shard import BlockMeta, Shard, ShardConfig


class Clock:
    t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def shard(tmp_path, ram=2, disk=2):
    cfg = ShardConfig(
        ram_slots=ram, disk_slots=disk, slot_bytes=slot_bytes_for(1000), disk_path=str(tmp_path / "slots")
    )
    return Shard(cfg, Clock())


def test_blocks_survive_demotion_to_disk_byte_for_byte(tmp_path):
    rng = random.Random(1)
    s = shard(tmp_path)
    blobs = {f"h{r}": rng.randbytes(900) for r in range(4)}
    for r in range(4):
        s.mark_round("sess", r)
        assert s.put([BlockMeta(f"h{r}", "sess", r)], [blobs[f"h{r}"]]) == 1
    assert s.stats()["slots_used"] == {"ram": 2, "disk": 2}  # rounds 0, 1 were demoted
    hashes = [f"h{r}" for r in range(4)]
    assert s.lookup(hashes) == 4
    assert s.get(hashes) == [blobs[h] for h in hashes]
    assert s.put([BlockMeta("h0", "sess", 0)], [blobs["h0"]]) == 0  # content-addressed: no copy


def test_a_corrupt_block_is_dropped_and_the_prefix_shortens(tmp_path):
    s = shard(tmp_path, ram=4, disk=0)
    s.put([BlockMeta(f"b{i}", "s", 0) for i in range(3)], [b"x" * 10] * 3)
    s.report_corrupt(["b1"])
    assert s.lookup(["b0", "b1", "b2"]) == 1
    assert s.get(["b0", "b1", "b2"]) == [b"x" * 10]
    assert s.finish_session("s") == 2 and s.stats()["blocks"] == 0


def test_an_oversized_block_is_declined_not_an_error(tmp_path):
    s = shard(tmp_path, ram=2, disk=0)
    assert s.put([BlockMeta("big", "s", 0), BlockMeta("ok", "s", 0)], [b"x" * 10_000, b"y"]) == 1
    assert s.lookup(["ok"]) == 1 and s.lookup(["big"]) == 0 and s.stats()["rejected"] == 1


# --- the one-sided data path's bookkeeping (no NIXL: the pool is read and written directly here) ---


def _payload(s, off, n):
    return s.ram.buffer[off : off + n].tobytes()


def test_pin_for_read_gives_the_ram_prefix_and_stops_at_disk(tmp_path):
    s = shard(tmp_path)
    blobs = {f"h{r}": bytes([r]) * (500 + r) for r in range(4)}
    for r in range(4):
        s.mark_round("sess", r)
        s.put([BlockMeta(f"h{r}", "sess", r)], [blobs[f"h{r}"]])
    # h0, h1 were demoted to disk: the RAM prefix of [h2, h3, h0, h1] is two blocks
    pins = s.pin_for_read(["h2", "h3", "h0", "h1"])
    assert [h for h, _, _ in pins] == ["h2", "h3"]
    assert all(_payload(s, off, n) == blobs[h] for h, off, n in pins)
    assert s.stats()["pinned"] == 2 and s.pin_for_read(["h0", "h2"]) == []  # disk first: nothing
    assert s.stats()["pinned"] == 2  # the disk block was not left pinned
    s.finish_read(["h2", "h3"], True)
    s.finish_read(["h2", "h3"], True)  # a second finish is ignored
    assert s.stats()["pinned"] == 0 and s.lookup(["h2", "h3"]) == 2


def test_finish_read_not_ok_drops_the_blocks(tmp_path):
    s = shard(tmp_path, ram=4, disk=0)
    s.put([BlockMeta(f"b{i}", "s", 0) for i in range(3)], [b"x" * 10] * 3)
    pins = s.pin_for_read(["b0", "b1", "b2", "missing"])
    assert [(h, n) for h, _, n in pins] == [("b0", 10), ("b1", 10), ("b2", 10)]
    s.finish_read(["b0", "b2"], True)
    s.finish_read(["b1"], False)  # the loader's codec rejected it
    assert s.lookup(["b0", "b1", "b2"]) == 1 and s.stats()["pinned"] == 0


def test_reserve_and_commit_write(tmp_path):
    s = shard(tmp_path, ram=3, disk=0)
    s.put([BlockMeta("old", "s", 0)], [b"o" * 20])
    metas = [
        BlockMeta("a", "s", 1),
        BlockMeta("old", "s", 0),
        BlockMeta("big", "s", 1),
        BlockMeta("b", "s", 1),
    ]
    places = s.reserve_for_write(metas, [100, 20, 10_000, 200])
    assert places[1] is None and places[2] is None and s.stats()["rejected"] == 1  # stored; too big
    (ha, off_a), (hb, off_b) = places[0], places[3]
    assert (ha, hb) == ("a", "b")
    s.ram.buffer[off_a : off_a + 100] = 7  # the writer's WRITE
    s.ram.buffer[off_b : off_b + 200] = 9
    assert s.lookup(["a"]) == 0  # pending: invisible until committed
    assert s.reserve_for_write([BlockMeta("a", "s", 1)], [100]) == [None]  # no second reservation
    assert s.commit_write(["a", "b"], [True, False]) == 1
    assert s.get(["a"]) == [b"\x07" * 100] and s.lookup(["b"]) == 0
    assert s.commit_write(["a", "b", "never"], True) == 0  # nothing reserved any more
    assert s.stats()["slots_used"] == {"ram": 2}  # b's slot was freed


def test_unfinished_leases_are_reclaimed_by_sweep(tmp_path):
    s = shard(tmp_path, ram=2, disk=0)
    assert s.cfg.lease_s == 30.0
    s.put([BlockMeta("kept", "s", 0)], [b"k" * 10])
    assert s.pin_for_read(["kept"])  # a reader that dies before finish_read
    ((h, _),) = [p for p in s.reserve_for_write([BlockMeta("w", "s", 0)], [50]) if p]  # a writer that dies
    assert s.stats()["slots_used"] == {"ram": 2} and s.stats()["pinned"] == 1
    assert s.sweep(now=s.clock() + 1) == 0  # within the lease: nothing happens
    assert s.sweep(now=s.clock() + 31) == 2
    assert s.stats()["slots_used"] == {"ram": 1} and s.stats()["pinned"] == 0 and s.lookup([h]) == 0
    assert s.commit_write([h], True) == 0  # too late: the slot went back
    s.finish_read(["kept"], True)  # too late too: ignored, the pin was released once
    assert s.lookup(["kept"]) == 1 and s.stats()["pinned"] == 0
    assert s.put([BlockMeta("w", "s", 0)], [b"w" * 50]) == 1  # the hash can be saved again


def test_bytes_transport_shard_and_client_without_nixl():
    from kvstore.transport.base import decode_metadata
    from kvstore.transport.client import NixlClient

    s = Shard(ShardConfig(ram_slots=4, slot_bytes=slot_bytes_for(1000), transport="ray"), Clock())
    info = decode_metadata(s.transport_metadata())
    assert info.nixl == b"" and info.size == s.ram.buffer.size and not s.transport.one_sided
    client = NixlClient(prefer="ray")
    assert not client.one_sided and client.peer(s) is None
    blobs = [b"a" * 30, b"b" * 40]
    assert client.put(s, [BlockMeta("x", "s", 0), BlockMeta("y", "s", 0)], blobs) == 2
    assert client.get(s, ["x", "y", "z"]) == blobs
    assert (
        client.stats["bytes_puts"] == 1 and client.stats["bytes_gets"] == 1 and client.stats["nixl_gets"] == 0
    )
    s.close()


def test_put_into_a_store_whose_every_slot_is_pinned_declines_instead_of_failing():
    from kvstore.shard.pool import slot_bytes_for
    from kvstore.shard.shard import BlockMeta, Shard, ShardConfig

    shard = Shard(ShardConfig(ram_slots=2, slot_bytes=slot_bytes_for(100)))
    assert shard.put([BlockMeta("a", "s", 0), BlockMeta("b", "s", 0)], [b"x" * 100, b"y" * 100]) == 2
    assert len(shard.pin_for_read(["a", "b"])) == 2  # both pinned by a reader
    assert shard.put([BlockMeta("c", "s", 1)], [b"z" * 100]) == 0
    assert shard.rejected == 1 and shard.lookup(["a", "b"]) == 2


def test_packed_get_and_put_carry_ram_and_disk_blocks_in_one_array(tmp_path):
    import numpy as np
    import pytest

    rng = random.Random(4)
    s = shard(tmp_path, ram=2, disk=2)
    blobs = [rng.randbytes(rng.randint(100, 900)) for _ in range(3)]
    metas = [BlockMeta(f"p{i}", "sess", i) for i in range(3)]
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    assert s.put_packed(metas, data, [len(b) for b in blobs]) == 3  # one demoted to disk on the way
    assert s.stats()["slots_used"] == {"ram": 2, "disk": 1}
    packed, offsets, sizes = s.get_packed([m.hash for m in metas] + ["absent"])
    assert sizes == [len(b) for b in blobs] and offsets == [0, sizes[0], sizes[0] + sizes[1]]
    assert bytes(packed) == b"".join(blobs)  # a disk block among them: packed into one buffer
    assert s.stats()["pinned"] == 0
    fresh = shard(tmp_path / "fresh", ram=3, disk=0)
    assert fresh.put_packed(metas, data, [len(b) for b in blobs]) == 3  # slots 0, 1, 2
    again, offsets, sizes = fresh.get_packed([m.hash for m in metas])
    assert [bytes(again[o : o + n]) for o, n in zip(offsets, sizes, strict=True)] == blobs
    assert offsets == [0, fresh.cfg.slot_bytes, 2 * fresh.cfg.slot_bytes]  # the slot stride:
    assert np.shares_memory(again, fresh.ram.buffer)  # a view of the pool, no copy
    with pytest.raises(ValueError, match="one size per block"):
        s.put_packed(metas, data, [1, 2])
