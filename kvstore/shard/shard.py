"""A store shard: the pure core (kvstore/core.py) with real bytes in RAM and disk slot pools.

Plain Python, so it is tested without Ray; `remote_shard` makes it a Ray actor pinned to one node.
Blocks are opaque encoded bytes here (kvstore/codec.py, checked by whoever loads them): a shard
never interprets, unpickles or executes what it stores. A failed copy rolls its change back, so
the index never points at bytes that are not there.

One-sided data path (kvstore/transport/client.py): `transport_metadata` registers the RAM pool with NIXL
(or BytesTransport with `transport: ray`) and returns the handshake bytes. Only offsets cross Ray:
- reads: `pin_for_read` pins the stored leading RAM-tier prefix and returns (hash, pool offset of the
  encoded block, length); the reader READs the spans, then `finish_read(ok)` unpins (ok=False drops
  them as corrupt). Disk-tier blocks stop the prefix: the reader fetches the rest with `get`.
- writes: `reserve_for_write` places each block (demoting first if needed), records the slot's
  length itself and returns the offset of the slot, where the writer WRITEs exactly `size` bytes;
  `commit_write(ok)` makes them visible (or frees the slots).
The same methods serve an in-process reader or writer (kvstore/connector/engine_store.py's LocalStore), which
uses the offsets as views into `ram.buffer` instead of NIXL spans: no copy at all.
Both are leases of `lease_s`: a pin or reservation that is never finished (its process died) is
released by `sweep`, which runs at every pin_for_read/reserve_for_write (and may be called on its own).
An expired reservation's slot is freed; an expired pin just unpins. A late WRITE into a freed slot
can only damage bytes the loader's codec checks (CRC, block hash), so it costs a recompute, no more.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kvstore.core import KvCore, Placement, StoreFull, Tier
from kvstore.shard.pool import LEN_BYTES, DiskPool, RamPool, SlotError
from kvstore.transport.base import BytesTransport, Transport, TransportError
from kvstore.transport.factory import make_transport

log = logging.getLogger("ponder.kvstore")
PACK_KEEP = 512 << 20  # get_packed keeps a buffer up to this size between calls


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ram_slots: int = Field(256, ge=1, description="Blocks held in host RAM.")
    disk_slots: int = Field(0, ge=0, description="Blocks held on disk; 0 = no disk tier.")
    slot_bytes: int = Field(ge=4096, description="Bytes per slot (kvstore.shard.pool.slot_bytes_for).")
    disk_path: str | None = Field(None, description="Preallocated slot file of the disk tier.")
    retention_window_s: float = Field(600.0, gt=0, description="Idle sessions' blocks go first after this.")
    transport: Literal["nixl", "ray"] = Field(
        "nixl", description="How clients reach the RAM pool: nixl = one-sided READ/WRITE, ray = Ray calls."
    )
    lease_s: float = Field(
        30.0, gt=0, description="A read pin or write reservation not finished within this is released."
    )


@dataclass(frozen=True)
class BlockMeta:
    hash: str
    session: str
    round: int
    branch: str = ""


class Shard:
    def __init__(self, cfg: ShardConfig, clock: Callable[[], float] = time.time, pin: bool = False) -> None:
        slots = {Tier.RAM: cfg.ram_slots}
        self.disk: DiskPool | None = None
        if cfg.disk_slots:
            if not cfg.disk_path:
                raise ValueError("disk_slots > 0 needs disk_path")
            slots[Tier.DISK] = cfg.disk_slots
            self.disk = DiskPool(Path(cfg.disk_path), cfg.disk_slots, cfg.slot_bytes)
        self.core = KvCore(slots, cfg.slot_bytes - LEN_BYTES, cfg.retention_window_s)
        self.ram = RamPool(cfg.ram_slots, cfg.slot_bytes, pin=pin)
        self.clock = clock
        self.rejected = 0  # blocks refused for size: a cache may decline, never fail the caller
        self.cfg = cfg
        self.transport: Transport | None = None  # created by transport_metadata on first use
        self._pins: dict[str, deque[float]] = {}  # hash -> deadlines of its pin_for_read pins
        self._writes: dict[str, float] = {}  # hash -> deadline of its reservation
        self._pack: np.ndarray | None = None  # get_packed's buffer

    def put(self, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        """Save blocks (a round's new ones, in order); returns how many were new."""
        saved = 0
        for i, (meta, blob) in enumerate(zip(metas, blobs, strict=True)):
            if len(blob) > self.core.slot_bytes:
                self.rejected += 1  # larger than a slot (e.g. a very long header): not cached
                continue
            try:
                p = self.core.prepare_put(
                    meta.hash,
                    session=meta.session,
                    round_=meta.round,
                    branch=meta.branch,
                    nbytes=len(blob),
                    now=self.clock(),
                )
            except StoreFull:  # every slot pinned or moving: decline the rest, never fail the caller
                self.rejected += len(metas) - i
                break
            if p is None:
                continue  # already stored: blocks are content-addressed
            self._demote_first(p)
            try:
                self.ram.write(p.slot, blob)
            except SlotError:
                self.core.complete_put(meta.hash, False)
                self.rejected += 1
                continue
            self.core.complete_put(meta.hash, True)
            saved += 1
        return saved

    def _demote_first(self, p: Placement) -> None:
        if p.demote is None:
            return
        assert self.disk is not None
        ok = True
        try:
            self.disk.write(p.demote.dst[1], self.ram.read(p.demote.src[1]))
        except OSError:
            ok = False  # the victim is dropped; its round is recomputed if needed
        self.core.complete_demote(p.demote.hash, ok)

    def lookup(self, hashes: list[str]) -> int:
        return self.core.lookup_prefix(hashes)

    def get(self, hashes: list[str]) -> list[bytes]:
        """The stored prefix of `hashes` as encoded blocks (copies: the slots may be reused)."""
        pinned = self.core.prepare_get(hashes, self.clock())
        out, ok = [], True
        try:
            for _, tier, slot in pinned:
                if tier is Tier.RAM:
                    out.append(bytes(self.ram.read(slot)))
                else:
                    assert self.disk is not None
                    out.append(self.disk.read(slot))
        except (SlotError, OSError):
            ok = False
        done = [h for h, _, _ in pinned]
        self.core.complete_get(done[: len(out)], True)
        if not ok:
            self.core.complete_get(done[len(out) :], False)  # unreadable: dropped, recomputed
        return out

    def get_packed(self, hashes: list[str]) -> tuple[np.ndarray, list[int], list[int]]:
        """The stored prefix of `hashes` in one array: (array, each block's offset in it, size).

        For callers over Ray: one numpy array travels out of band (Ray copies it into its object
        store once and a reader on the node maps it without copying), where a list of bytes is
        copied into and out of the serialized stream. Blocks in consecutive RAM slots (the usual
        case: a round's chunks are put together into the lowest free slots) go as one view of the
        pool, at the slot stride, without even a copy here; others are packed into a buffer first.
        Ray copies a return value before the actor runs its next call, so neither a view of the
        pool nor the reused buffer can change under it."""
        pinned = self.core.prepare_get(hashes, self.clock())
        sizes = [self.core.blocks[h].nbytes for h, _, _ in pinned]
        done = [h for h, _, _ in pinned]
        slots = [slot for _, tier, slot in pinned if tier is Tier.RAM]
        if pinned and len(slots) == len(pinned) and slots == list(range(slots[0], slots[0] + len(slots))):
            first, stride = self.ram.offset(slots[0]), self.cfg.slot_bytes
            self.core.complete_get(done, True)
            view = self.ram.buffer[first : first + stride * (len(slots) - 1) + sizes[-1]]
            return view, [i * stride for i in range(len(slots))], sizes
        out = self._packing(sum(sizes))
        got, off = 0, 0
        try:
            for (_, tier, slot), n in zip(pinned, sizes, strict=True):
                src = self.ram.read(slot) if tier is Tier.RAM else self.disk.read(slot)  # type: ignore[union-attr]
                if len(src) != n:
                    raise SlotError(f"slot {slot} holds {len(src)} bytes, the index says {n}")
                out[off : off + n] = np.frombuffer(src, dtype=np.uint8)
                off += n
                got += 1
        except (SlotError, OSError):
            pass
        self.core.complete_get(done[:got], True)
        self.core.complete_get(done[got:], False)  # unreadable: dropped, recomputed
        offsets = [sum(sizes[:i]) for i in range(got)]
        return out[: sum(sizes[:got])], offsets, sizes[:got]

    def _packing(self, n: int) -> np.ndarray:
        """A reused, resident buffer for get_packed's result. Ray copies a return value into its
        object store when the call ends, before the actor runs its next call, so reusing it is safe;
        a fresh 45 MiB array cost page faults on every call (measured 13 ms vs 100-126 ms a call).
        Results over PACK_KEEP are packed into a one-off array instead of a kept one."""
        if n > PACK_KEEP:
            return np.empty(n, np.uint8)
        if self._pack is None or self._pack.size < n:
            grown = max(n, 2 * (0 if self._pack is None else self._pack.size))
            self._pack = np.empty(min(grown, PACK_KEEP), np.uint8)
            self._pack.fill(0)
        return self._pack[:n]

    def put_packed(self, metas: list[BlockMeta], data: np.ndarray, sizes: list[int]) -> int:
        """`put` of blocks laid one after another in `data` (see get_packed)."""
        if len(sizes) != len(metas) or sum(sizes) != len(data) or any(n < 0 for n in sizes):
            raise ValueError("put_packed: one size per block, summing to the data's length")
        views, off = [], 0
        for n in sizes:
            views.append(memoryview(data[off : off + n]))
            off += n
        return self.put(metas, views)

    def report_corrupt(self, hashes: list[str]) -> None:
        """A loader rejected these blocks (checksum, model, layout): drop them."""
        for h in hashes:
            self.core.prepare_get([h], self.clock())
            self.core.complete_get([h], False)

    def mark_round(self, session: str, round_: int) -> None:
        self.core.mark_round(session, round_, self.clock())

    def mark_exited(self, session: str) -> None:
        self.core.mark_exited(session, self.clock())

    def finish_session(self, session: str) -> int:
        return len(self.core.finish_session(session))

    def stats(self) -> dict:
        return {**self.core.stats(), "rejected": self.rejected}

    def node_id(self) -> str:
        """The Ray node this shard runs on ("" outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # --- one-sided data path (kvstore/transport/client.py) -------------------------------------------

    def transport_metadata(self) -> bytes:
        """The handshake for clients (kvstore/transport/base.py's metadata); registers the pool once.

        With `transport: ray`, or where NIXL cannot start, it is BytesTransport's (no NIXL part):
        clients then move this shard's blocks with `get`/`put`.
        """
        if self.transport is None:
            name = f"shard-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                t = make_transport(name, prefer=self.cfg.transport)
                t.register(self.ram.buffer)
            except TransportError as e:  # e.g. no UCX backend: still a working shard, over Ray
                log.warning("kv shard: NIXL unavailable (%s); clients use Ray bytes", e)
                t = BytesTransport(name)
                t.register(self.ram.buffer)
            self.transport = t
        return self.transport.metadata()

    def sweep(self, now: float | None = None) -> int:
        """Release expired read pins and write reservations; returns how many were released."""
        now = self.clock() if now is None else now
        released = 0
        for h in [h for h, deadline in self._writes.items() if deadline <= now]:
            del self._writes[h]
            self.core.complete_put(h, False)  # the writer is gone: the slot is free again
            released += 1
        for h in list(self._pins):
            pins = self._pins[h]
            while pins and pins[0] <= now:
                pins.popleft()
                self.core.complete_get([h], True)  # unpin; the bytes were fine
                released += 1
            if not pins:
                del self._pins[h]
        self.core.forget_idle(now)  # session entries without blocks, idle past the window
        return released

    def pin_for_read(self, hashes: list[str]) -> list[tuple[str, int, int]]:
        """Pin the stored leading RAM-tier prefix of `hashes`: (hash, pool offset, length) each.

        The offset is that of the encoded block (after the slot's length prefix). The first block on
        disk, missing or not ready ends the list; the caller gets the rest with `get`. Unpin with
        finish_read, or the lease runs out (sweep).
        """
        now = self.clock()
        self.sweep(now)
        n = self.core.lookup_prefix(hashes)
        k = 0
        while k < n and self.core.blocks[hashes[k]].tier is Tier.RAM:
            k += 1
        pinned = self.core.prepare_get(hashes[:k], now)
        out: list[tuple[str, int, int]] = []
        for i, (h, _, slot) in enumerate(pinned):
            try:
                size = len(self.ram.read(slot))
            except SlotError:
                size = -1
            if size != self.core.blocks[h].nbytes:  # a damaged length prefix: drop it and what follows
                self.core.complete_get([h], False)
                self.core.complete_get([p[0] for p in pinned[i + 1 :]], True)
                break
            self._pins.setdefault(h, deque()).append(now + self.cfg.lease_s)
            out.append((h, self.ram.offset(slot), size))
        return out

    def finish_read(self, hashes: list[str], ok: bool = True) -> None:
        """Unpin blocks pinned by pin_for_read; ok=False drops them as corrupt (like report_corrupt).

        Hashes without an outstanding pin (never pinned, or released by sweep) are ignored.
        """
        for h in hashes:
            pins = self._pins.get(h)
            if not pins:
                continue
            pins.popleft()
            if not pins:
                del self._pins[h]
            self.core.complete_get([h], ok)

    def reserve_for_write(self, metas: list[BlockMeta], sizes: list[int]) -> list[tuple[str, int] | None]:
        """Phase 1 of a one-sided put: per block (hash, pool offset where the writer puts its bytes).

        The shard has already recorded the slot's length (`size`); the writer WRITEs exactly `size`
        bytes at the offset, then calls commit_write. None: already stored, too big, or no
        slot can be freed (every block pinned or pending) — nothing to send for it.
        """
        now = self.clock()
        self.sweep(now)
        out: list[tuple[str, int] | None] = []
        for meta, size in zip(metas, sizes, strict=True):
            out.append(self._reserve(meta, size, now))
        return out

    def _reserve(self, meta: BlockMeta, size: int, now: float) -> tuple[str, int] | None:
        if not 0 < size <= self.core.slot_bytes:
            self.rejected += 1
            return None
        try:
            p = self.core.prepare_put(
                meta.hash, session=meta.session, round_=meta.round, branch=meta.branch, nbytes=size, now=now
            )
        except StoreFull:
            self.rejected += 1
            return None
        if p is None:
            return None  # already stored (or being written by someone else)
        self._demote_first(p)
        self.ram.set_length(p.slot, size)
        self._writes[meta.hash] = now + self.cfg.lease_s
        return meta.hash, self.ram.offset(p.slot)

    def commit_write(self, hashes: list[str], ok: list[bool] | bool = True) -> int:
        """Phase 2: commit (ok) or free (not ok) reserved blocks; returns how many were committed.

        Hashes without a live reservation (never reserved, committed already, expired) are ignored.
        """
        oks = [ok] * len(hashes) if isinstance(ok, bool) else list(ok)
        if len(oks) != len(hashes):
            raise ValueError("commit_write: one ok per hash")
        done = 0
        for h, good in zip(hashes, oks, strict=True):
            if self._writes.pop(h, None) is None:
                continue
            self.core.complete_put(h, bool(good))
            done += bool(good)
        return done
