"""Fixed-size slot storage for serialized KV blocks: host RAM and disk (NVMe).

Both tiers are preallocated once, so saving a block never allocates: RAM is one contiguous uint8
array (one region for NIXL to register), disk is one preallocated file written with pwrite. A slot
holds a 4-byte length and then the encoded block (kvstore/codec.py), which is self-describing.
Size slots from the model's block size (`slot_bytes_for`): the waste is the header and rounding
only. Compression is not used: KV activations are high-entropy floats and the copy is the cost.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

_LEN = struct.Struct("<I")
HEADER_ALLOWANCE = 512  # bytes kept for the codec's header in every slot
ALIGN = 4096  # page-aligned slots: O_DIRECT-friendly on disk, cache-friendly in RAM


def slot_bytes_for(payload_bytes: int) -> int:
    """The slot size for blocks with this payload: length prefix + header allowance, page-rounded."""
    need = _LEN.size + HEADER_ALLOWANCE + payload_bytes
    return -(-need // ALIGN) * ALIGN


class SlotError(ValueError):
    pass


def _check(slot: int, n: int, slots: int, slot_bytes: int) -> None:
    if not 0 <= slot < slots:
        raise SlotError(f"slot {slot} outside 0..{slots - 1}")
    if n + _LEN.size > slot_bytes:
        raise SlotError(f"{n} bytes do not fit a {slot_bytes}-byte slot")


class RamPool:
    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        # Touched now, so the pool is resident from the start and saves take no page faults later
        # (np.zeros alone maps lazy zero pages: RSS would creep up as slots are first written).
        self.buffer = np.empty(slots * slot_bytes, dtype=np.uint8)
        self.buffer.fill(0)

    def offset(self, slot: int) -> int:
        return slot * self.slot_bytes

    def write(self, slot: int, data: bytes | memoryview) -> None:
        n = len(data)
        _check(slot, n, self.slots, self.slot_bytes)
        o = self.offset(slot)
        self.buffer[o : o + _LEN.size] = np.frombuffer(_LEN.pack(n), dtype=np.uint8)
        self.buffer[o + _LEN.size : o + _LEN.size + n] = np.frombuffer(data, dtype=np.uint8)

    def read(self, slot: int) -> memoryview:
        """Zero-copy view of the slot's block (valid until the slot is rewritten)."""
        _check(slot, 0, self.slots, self.slot_bytes)
        o = self.offset(slot)
        (n,) = _LEN.unpack(self.buffer[o : o + _LEN.size].tobytes())
        if n + _LEN.size > self.slot_bytes:
            raise SlotError(f"slot {slot} declares {n} bytes, more than it holds")
        return memoryview(self.buffer[o + _LEN.size : o + _LEN.size + n])


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
        os.pwrite(self.fd, _LEN.pack(len(data)) + bytes(data), slot * self.slot_bytes)

    def read(self, slot: int) -> bytes:
        _check(slot, 0, self.slots, self.slot_bytes)
        o = slot * self.slot_bytes
        (n,) = _LEN.unpack(os.pread(self.fd, _LEN.size, o))
        if n + _LEN.size > self.slot_bytes:
            raise SlotError(f"slot {slot} declares {n} bytes, more than it holds")
        data = os.pread(self.fd, n, o + _LEN.size)
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
