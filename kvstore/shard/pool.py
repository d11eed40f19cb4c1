"""Fixed-size slot storage for serialized KV blocks: host RAM and disk (NVMe).

Both tiers are preallocated once, so saving a block never allocates: RAM is one contiguous uint8
array (one region for NIXL to register; page-locked when a GPU is there, so DMAs run straight from
slots), disk is one preallocated file written with pwrite. A slot holds the encoded block
(kvstore/codec.py, self-describing) from its first byte, and its length in the slot's last 4 bytes:
slots are page-aligned, so a block's payload (at codec.PAYLOAD_OFFSET) is page-aligned too and can be
viewed as a tensor in place. Size slots from the chunk's payload (`slot_bytes_for`): the waste is
the header area and rounding only. Compression is not used: KV activations are high-entropy floats
and the copy is the cost.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from kvstore.codec import block_bytes
from kvstore.transport.memory import host_buffer

_LEN = struct.Struct("<I")
LEN_BYTES = _LEN.size  # the length trailer at the end of every slot
ALIGN = 4096  # page-aligned slots: O_DIRECT-friendly on disk, DMA- and cache-friendly in RAM


def slot_bytes_for(payload_bytes: int) -> int:
    """The slot size for chunks with this payload: header area + payload + length, page-rounded."""
    need = block_bytes(payload_bytes) + LEN_BYTES
    return -(-need // ALIGN) * ALIGN


class SlotError(ValueError):
    pass


def _check(slot: int, n: int, slots: int, slot_bytes: int) -> None:
    if not 0 <= slot < slots:
        raise SlotError(f"slot {slot} outside 0..{slots - 1}")
    if n + LEN_BYTES > slot_bytes:
        raise SlotError(f"{n} bytes do not fit a {slot_bytes}-byte slot")


class RamPool:
    def __init__(self, slots: int, slot_bytes: int, pin: bool = False) -> None:
        if slot_bytes % ALIGN:
            raise SlotError(f"slot_bytes {slot_bytes} is not a multiple of {ALIGN}")
        self.slots, self.slot_bytes = slots, slot_bytes
        self.buffer = host_buffer(slots * slot_bytes, pin)

    def offset(self, slot: int) -> int:
        """Where the slot's block starts in `buffer`."""
        return slot * self.slot_bytes

    def set_length(self, slot: int, n: int) -> None:
        """Record the length of the block the slot holds (or is about to hold)."""
        _check(slot, n, self.slots, self.slot_bytes)
        end = self.offset(slot) + self.slot_bytes
        self.buffer[end - LEN_BYTES : end] = np.frombuffer(_LEN.pack(n), dtype=np.uint8)

    def write(self, slot: int, data: bytes | memoryview) -> None:
        n = len(data)
        self.set_length(slot, n)
        o = self.offset(slot)
        self.buffer[o : o + n] = np.frombuffer(data, dtype=np.uint8)

    def length(self, slot: int) -> int:
        _check(slot, 0, self.slots, self.slot_bytes)
        end = self.offset(slot) + self.slot_bytes
        (n,) = _LEN.unpack(self.buffer[end - LEN_BYTES : end].tobytes())
        if n + LEN_BYTES > self.slot_bytes:
            raise SlotError(f"slot {slot} declares {n} bytes, more than it holds")
        return n

    def read(self, slot: int) -> memoryview:
        """Zero-copy view of the slot's block (valid until the slot is rewritten)."""
        n = self.length(slot)
        o = self.offset(slot)
        return memoryview(self.buffer[o : o + n])

    def view(self, slot: int, n: int) -> memoryview:
        """The first `n` bytes of a slot, writable (a writer fills a reserved slot in place)."""
        _check(slot, n, self.slots, self.slot_bytes)
        o = self.offset(slot)
        return memoryview(self.buffer[o : o + n])


class DiskPool:
    def __init__(self, path: str | Path, slots: int, slot_bytes: int) -> None:
        self.path, self.slots, self.slot_bytes = Path(path), slots, slot_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        size = slots * slot_bytes
        try:
            os.posix_fallocate(self.fd, 0, size)  # reserve the space now: a full disk fails here
        except OSError as exc:
            os.close(self.fd)
            raise SlotError(f"cannot reserve {size} bytes in {self.path}: {exc.strerror}") from exc

    def write(self, slot: int, data: bytes | memoryview) -> None:
        _check(slot, len(data), self.slots, self.slot_bytes)
        o = slot * self.slot_bytes
        os.pwrite(self.fd, data, o)
        os.pwrite(self.fd, _LEN.pack(len(data)), o + self.slot_bytes - LEN_BYTES)

    def read(self, slot: int) -> bytes:
        _check(slot, 0, self.slots, self.slot_bytes)
        o = slot * self.slot_bytes
        (n,) = _LEN.unpack(os.pread(self.fd, LEN_BYTES, o + self.slot_bytes - LEN_BYTES))
        if n + LEN_BYTES > self.slot_bytes:
            raise SlotError(f"slot {slot} declares {n} bytes, more than it holds")
        data = os.pread(self.fd, n, o)
        if len(data) != n:
            raise SlotError(f"slot {slot}: short read ({len(data)} of {n} bytes)")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def waste_fraction(stored: list[int], slot_bytes: int) -> float:
    """Share of the occupied slots' bytes that hold nothing (header allowance and rounding)."""
    if not stored:
        return 0.0
    return 1.0 - sum(stored) / (len(stored) * slot_bytes)
