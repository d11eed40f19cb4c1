"""RAM and disk slot pools: round trips, bounds, corrupt lengths, waste of real chunk sizes."""

import random

import pytest

from kvstore.codec import PAYLOAD_OFFSET
from kvstore.shard.pool import ALIGN, DiskPool, RamPool, SlotError, slot_bytes_for, waste_fraction


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


def test_blocks_start_page_aligned_and_are_read_in_place():
    slot = slot_bytes_for(10_000)
    ram = RamPool(3, slot)
    ram.write(2, b"abc")
    view = ram.read(2)
    assert slot % ALIGN == 0 and ram.offset(2) % ALIGN == 0
    assert view.obj is not None and bytes(view) == b"abc"
    ram.buffer[ram.offset(2)] = ord("x")  # a view, not a copy: it sees the pool change
    assert bytes(view) == b"xbc"


def test_a_corrupt_length_is_refused(tmp_path):
    slot = slot_bytes_for(100)
    ram = RamPool(1, slot)
    ram.buffer[slot - 4 : slot] = [255, 255, 255, 255]  # the length lives in the slot's last 4 bytes
    with pytest.raises(SlotError, match="declares"):
        ram.read(0)
    disk = DiskPool(tmp_path / "d", 1, slot)
    import os

    os.pwrite(disk.fd, b"\xff\xff\xff\x7f", slot - 4)
    with pytest.raises(SlotError, match="declares"):
        disk.read(0)
    disk.close()


def test_slot_waste_for_real_model_chunks_is_under_four_percent():
    # bf16 chunks of 16 and 256 tokens: SmolLM2-135M (30 layers, 3 KV heads, head_dim 64),
    # Qwen2.5-0.5B (24, 2, 64), Llama-3.1-8B (32, 8, 128). Only the payload counts as held: the
    # header area (~300 bytes of header, zeros to PAYLOAD_OFFSET) and rounding are waste.
    for layers, heads, head_dim in ((30, 3, 64), (24, 2, 64), (32, 8, 128)):
        for tokens in (16, 256):
            payload = layers * 2 * heads * tokens * head_dim * 2
            slot = slot_bytes_for(payload)
            assert slot >= payload + PAYLOAD_OFFSET + 4
            # a 4 KiB header area is a few % of a 16-token block, nothing for a 256-token chunk
            assert waste_fraction([payload] * 10, slot) < (0.045 if tokens == 16 else 0.005)
