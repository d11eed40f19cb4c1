"""The store as seen from inside a vLLM engine process: the cluster's shards, or a local shard.

vLLM runs its engine core (scheduler and, by default, the model worker) in a process it spawns
itself, which is not a Ray worker. To reach the shard actors that process joins the cluster as a
Ray driver (`ray.init(address=<GCS>)`, once per process) and finds the shards by name. Both
connector roles of one process share one store (`shared_store`).

The worker side moves bytes through *leases*, so no layer of the path copies a chunk it does not
have to (kvstore/connector/datapath.py):
- `read(session, hashes)` -> `ReadLease`: the stored leading prefix of `hashes` as views of encoded
  chunks — into the local shard's RAM pool (pinned there until `release`), into the NIXL staging
  buffer the chunks were READ into, or Ray bytes. `release(bad)` unpins and drops the `bad` ones as
  corrupt.
- `open_write(session, metas, size)` -> `WriteLease`: one writable view of `size` bytes per chunk
  (None: the store has it already or has no room) — a reserved slot of the local shard, the NIXL
  staging buffer, or a local buffer for Ray bytes — that the writer fills with the encoded chunk in
  place; `commit(ok)` ships what needs shipping and makes the chunks visible.
A lease is always released or committed exactly once (a second call does nothing).

Chunks this process is still writing (a save's lease opened, not yet committed) count as stored for
its own lookups, and a read waits for them (`InFlight`): a round that follows its previous round on
the same engine never misses that round's asynchronous save. Another engine sees them once they
are committed.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter

import numpy as np

from kvstore.connector.config import KvConnectorConfig
from kvstore.shard.client import StoreClient, find_shards
from kvstore.shard.shard import BlockMeta, Shard, ShardConfig
from kvstore.transport.leases import ReadLease, WriteLease, nothing
from kvstore.transport.memory import host_buffer

log = logging.getLogger("ponder.kvstore")

_lock = threading.Lock()
_stores: dict[str, object] = {}


class InFlight:
    """The chunks this process is writing: opened for a save, not yet committed."""

    def __init__(self, wait_s: float = 5.0) -> None:
        self._cv = threading.Condition()
        self._hashes: Counter[str] = Counter()
        self.wait_s = wait_s

    def track(self, lease: WriteLease) -> WriteLease:
        """Count the lease's chunks in flight until its commit has run (whatever its outcome)."""
        hashes = [m.hash for m, v in zip(lease.metas, lease.views, strict=True) if v is not None]
        with self._cv:
            self._hashes.update(hashes)
        commit = lease._commit

        def done(ok: list[bool]) -> int:
            try:
                return commit(ok) if commit is not None else 0
            finally:
                with self._cv:
                    self._hashes.subtract(hashes)
                    self._hashes += Counter()  # drop the zeros
                    self._cv.notify_all()

        lease._commit = done
        return lease

    def extend(self, hashes: list[str], n: int) -> int:
        """The stored prefix `n` of `hashes`, extended by the chunks this process is writing."""
        with self._cv:
            while n < len(hashes) and hashes[n] in self._hashes:
                n += 1
        return n

    def wait(self, hashes: list[str]) -> None:
        """Until none of `hashes` is being written here (bounded: a stuck save is a miss, no more)."""
        with self._cv:
            self._cv.wait_for(lambda: not any(h in self._hashes for h in hashes), self.wait_s)


class LocalStore:
    """One in-process shard behind the store interface; leases are views of its RAM pool (no copy)."""

    def __init__(self, slots: int, slot_bytes: int, pin: bool = False) -> None:
        self.shard = Shard(ShardConfig(ram_slots=slots, slot_bytes=slot_bytes, transport="ray"), pin=pin)
        self._lock = threading.Lock()  # the save thread and the step share the shard
        self.inflight = InFlight()

    def lookup(self, session: str, hashes: list[str]) -> int:
        with self._lock:
            n = self.shard.lookup(hashes)
        return self.inflight.extend(hashes, n)

    def get(self, session: str, hashes: list[str]) -> list[bytes]:
        with self._lock:
            return self.shard.get(hashes)

    def put(self, session: str, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        with self._lock:
            return self.shard.put(metas, blobs)

    def read(self, session: str, hashes: list[str]) -> ReadLease:
        buf = self.shard.ram.buffer
        self.inflight.wait(hashes)
        with self._lock:
            pins = self.shard.pin_for_read(hashes)
            rest = self.shard.get(hashes[len(pins) :]) if len(pins) < len(hashes) else []
        blobs: list[memoryview | bytes] = [memoryview(buf[off : off + n]) for _, off, n in pins]
        pinned = [h for h, _, _ in pins]

        def release(bad: list[str]) -> None:
            with self._lock:
                self.shard.finish_read([h for h in pinned if h not in bad], True)
                self.shard.finish_read([h for h in pinned if h in bad], False)
                self.shard.report_corrupt([h for h in bad if h not in pinned])

        region = (buf, [off for _, off, _ in pins]) if not rest else None
        return ReadLease(hashes, blobs + list(rest), release, region)

    def open_write(self, session: str, metas: list[BlockMeta], size: int) -> WriteLease:
        buf = self.shard.ram.buffer
        with self._lock:
            places = self.shard.reserve_for_write(metas, [size] * len(metas))
        views = [None if p is None else memoryview(buf[p[1] : p[1] + size]) for p in places]

        def commit(ok: list[bool]) -> int:
            hashes = [m.hash for m, p in zip(metas, places, strict=True) if p is not None]
            oks = [o for o, p in zip(ok, places, strict=True) if p is not None]
            with self._lock:
                return self.shard.commit_write(hashes, oks)

        region = (buf, [p[1] for p in places if p is not None])
        return self.inflight.track(WriteLease(metas, views, commit, region))

    def report_corrupt(self, session: str, hashes: list[str]) -> None:
        with self._lock:
            self.shard.report_corrupt(hashes)

    def mark_round(self, session: str, round_: int) -> None:
        with self._lock:
            self.shard.mark_round(session, round_)


class RayStore(StoreClient):
    """The cluster's shards, rediscovered every `refresh_s` (shards join with nodes)."""

    def __init__(self, cfg: KvConnectorConfig, refresh_s: float = 10.0, pin: bool = False) -> None:
        import ray

        if not ray.is_initialized():
            t0 = time.perf_counter()
            ray.init(address=cfg.ray_address or "auto", namespace=cfg.namespace, log_to_driver=False)
            log.info("engine process joined the Ray cluster in %.1f s", time.perf_counter() - t0)
        self.namespace, self.pin = cfg.namespace, pin
        discover = functools.partial(find_shards, cfg.namespace)
        super().__init__(discover(), timeout_s=cfg.timeout_s, discover=discover, refresh_s=refresh_s)
        self.inflight = InFlight(cfg.timeout_s)
        self.nixl = None
        if cfg.transport == "nixl":
            from kvstore.transport.client import NixlClient

            client = NixlClient(
                f"engine-{os.getpid()}", staging_bytes=cfg.staging_bytes, timeout_s=cfg.timeout_s, pin=pin
            )
            self.nixl = client if client.one_sided else None  # no NIXL here: every shard over Ray

    def get(self, session: str, hashes: list[str]) -> list[bytes]:
        lease = self.read(session, hashes)
        out = [bytes(b) for b in lease.blobs]
        lease.release()
        return out

    def put(self, session: str, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        if self.nixl is None or not self.shards:
            return super().put(session, metas, blobs)
        name = self.ring.owner(session)
        return self.nixl.put(self.shards[name], metas, blobs, name=name)

    def lookup(self, session: str, hashes: list[str]) -> int:
        return self.inflight.extend(hashes, super().lookup(session, hashes))

    def read(self, session: str, hashes: list[str]) -> ReadLease:
        if not hashes or not self.shards:
            return ReadLease(hashes, [], nothing)
        self.inflight.wait(hashes)
        if self.nixl is None:  # one array over Ray, mapped from its object store without a copy
            empty = (np.empty(0, np.uint8), [], [])
            data, offsets, sizes = self._call(session, "get_packed", hashes, default=empty)
            blobs = [memoryview(data[o : o + n]) for o, n in zip(offsets, sizes, strict=True)]

            def release(bad: list[str]) -> None:
                if bad:
                    self.report_corrupt(session, bad)

            return ReadLease(hashes, blobs, release, (data, offsets))
        name = self.ring.owner(session)  # one-sided READ, Ray bytes for what cannot go that way
        return self.nixl.read(self.shards[name], hashes, name=name)

    def open_write(self, session: str, metas: list[BlockMeta], size: int) -> WriteLease:
        if self.nixl is not None and self.shards:
            name = self.ring.owner(session)
            return self.inflight.track(self.nixl.open_write(self.shards[name], metas, size, name=name))
        buf = host_buffer(size * len(metas), self.pin)
        views = [memoryview(buf[i * size : (i + 1) * size]) for i in range(len(metas))]

        def commit(ok: list[bool]) -> int:
            chosen = [i for i, o in enumerate(ok) if o]
            if not chosen or not self.shards:
                return 0
            if len(chosen) == len(metas):
                data = buf
            else:  # rare (a chunk the writer gave up): pack the rest
                data = np.concatenate([buf[i * size : (i + 1) * size] for i in chosen])
            args = ([metas[i] for i in chosen], data, [size] * len(chosen))
            return self._call(session, "put_packed", *args, default=0)

        region = (buf, [i * size for i in range(len(metas))])
        return self.inflight.track(WriteLease(metas, list(views), commit, region))


def shared_store(cfg: KvConnectorConfig, slot_bytes: int, pin: bool = False) -> object:
    """This process's store for `cfg` (created on first use). `pin`: page-lock host buffers (GPU)."""
    key = f"{cfg.store}|{cfg.ray_address}|{cfg.namespace}"
    with _lock:
        if key not in _stores:
            if cfg.store == "local":
                _stores[key] = LocalStore(cfg.local_ram_slots, slot_bytes, pin=pin)
            else:
                _stores[key] = RayStore(cfg, pin=pin)
        return _stores[key]


def as_array(view: memoryview | bytes) -> np.ndarray:
    """A uint8 array over a lease's bytes (no copy; read-only for bytes)."""
    return np.frombuffer(view, dtype=np.uint8)
