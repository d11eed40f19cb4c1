"""A store shard with real RAM and disk pools (no Ray): bytes survive demotion, failures roll back."""

import random

from kvstore.pool import slot_bytes_for
from kvstore.shard import BlockMeta, Shard, ShardConfig


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
