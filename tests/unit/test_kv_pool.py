"""RAM and disk slot pools: round trips, bounds, corrupt length prefixes, waste of real block sizes."""

import random

import pytest

from kvstore.pool import DiskPool, RamPool, SlotError, slot_bytes_for, waste_fraction


def test_ram_and_disk_round_trip_and_bounds(tmp_path):
    rng = random.Random(0)
    slot = slot_bytes_for(10_000)
    ram, disk = RamPool(4, slot), DiskPool(tmp_path / "kv.slots", 4, slot)
    blobs = [rng.randbytes(rng.randint(1, 10_000)) for _ in range(4)]
    for i, b in enumerate(blobs):
        ram.write(i, b)
        disk.write(i, b)
    assert [bytes(ram.read(i)) for i in range(4)] == blobs == [disk.read(i) for i in range(4)]
    ram.write(1, b"short")  # a rewrite of a slot replaces its length too
    assert bytes(ram.read(1)) == b"short"
    with pytest.raises(SlotError, match="outside"):
        ram.write(4, b"x")
    with pytest.raises(SlotError, match="do not fit"):
        disk.write(0, b"x" * slot)
    assert (tmp_path / "kv.slots").stat().st_size == 4 * slot  # preallocated
    disk.close()


def test_a_corrupt_length_prefix_is_refused(tmp_path):
    slot = slot_bytes_for(100)
    ram = RamPool(1, slot)
    ram.buffer[:4] = [255, 255, 255, 255]
    with pytest.raises(SlotError, match="declares"):
        ram.read(0)
    disk = DiskPool(tmp_path / "d", 1, slot)
    import os

    os.pwrite(disk.fd, b"\xff\xff\xff\x7f", 0)
    with pytest.raises(SlotError, match="declares"):
        disk.read(0)
    disk.close()


def test_slot_waste_for_real_model_blocks_is_under_four_percent():
    # 16-token blocks, bf16: SmolLM2-135M (30 layers, 3 KV heads, head_dim 64) and Qwen2.5-0.5B
    # (24 layers, 2 KV heads, head_dim 64); the codec header is ~200 bytes
    for layers, heads, head_dim in ((30, 3, 64), (24, 2, 64)):
        payload = layers * 2 * heads * 16 * head_dim * 2
        slot = slot_bytes_for(payload)
        assert waste_fraction([payload + 4 + 200] * 10, slot) < 0.04
