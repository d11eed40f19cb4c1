"""The store as seen from inside a vLLM engine process: the cluster's shards, or a local shard.

vLLM runs its engine core (scheduler and, by default, the model worker) in a process it spawns
itself, which is not a Ray worker. To reach the shard actors that process joins the cluster as a
Ray driver (`ray.init(address=<GCS>)`, once per process) and finds the shards by name. Both
connector roles of one process share one store (`shared_store`).

The worker side moves bytes through *leases*, so no layer of the path copies a chunk it does not
have to (kvstore/datapath.py):
- `read(session, hashes)` -> `ReadLease`: the stored leading prefix of `hashes` as views of encoded
  chunks — into the local shard's RAM pool (pinned there until `release`), into the NIXL staging
  buffer the chunks were READ into, or Ray bytes. `release(bad)` unpins and drops the `bad` ones as
  corrupt.
- `open_write(session, metas, size)` -> `WriteLease`: one writable view of `size` bytes per chunk
  (None: the store has it already or has no room) — a reserved slot of the local shard, the NIXL
  staging buffer, or a local buffer for Ray bytes — that the writer fills with the encoded chunk in
  place; `commit(ok)` ships what needs shipping and makes the chunks visible.
A lease is always released or committed exactly once (a second call does nothing).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from kvstore.client import SHARD_PREFIX, StoreClient
from kvstore.connector_config import KvConnectorConfig
from kvstore.leases import ReadLease, WriteLease, nothing
from kvstore.pool import host_buffer
from kvstore.shard import BlockMeta, Shard, ShardConfig

log = logging.getLogger("ponder.kvstore")

_lock = threading.Lock()
_stores: dict[str, object] = {}


class LocalStore:
    """One in-process shard behind the store interface; leases are views of its RAM pool (no copy)."""

    def __init__(self, slots: int, slot_bytes: int, pin: bool = False) -> None:
        self.shard = Shard(ShardConfig(ram_slots=slots, slot_bytes=slot_bytes, transport="bytes"), pin=pin)
        self._lock = threading.Lock()  # the save thread and the step share the shard

    def lookup(self, session: str, hashes: list[str]) -> int:
        with self._lock:
            return self.shard.lookup(hashes)

    def get(self, session: str, hashes: list[str]) -> list[bytes]:
        with self._lock:
            return self.shard.get(hashes)

    def put(self, session: str, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        with self._lock:
            return self.shard.put(metas, blobs)

    def read(self, session: str, hashes: list[str]) -> ReadLease:
        buf = self.shard.ram.buffer
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

        return WriteLease(metas, views, commit, (buf, [p[1] for p in places if p is not None]))

    def report_corrupt(self, session: str, hashes: list[str]) -> None:
        with self._lock:
            self.shard.report_corrupt(hashes)

    def notify(self, session: str, method: str, *args) -> None:
        with self._lock:
            getattr(self.shard, method)(*args)


class RayStore(StoreClient):
    """The cluster's shards, rediscovered every `refresh_s` (shards join with nodes)."""

    def __init__(self, cfg: KvConnectorConfig, refresh_s: float = 10.0, pin: bool = False) -> None:
        import ray

        if not ray.is_initialized():
            t0 = time.perf_counter()
            ray.init(address=cfg.ray_address or "auto", namespace=cfg.namespace, log_to_driver=False)
            log.info("engine process joined the Ray cluster in %.1f s", time.perf_counter() - t0)
        self.namespace, self.refresh_s, self.pin = cfg.namespace, refresh_s, pin
        super().__init__(self._discover(), timeout_s=cfg.timeout_s)
        self._seen = time.monotonic()
        self.nixl = None
        if cfg.transport == "nixl":
            from kvstore.nixl_client import NixlClient

            client = NixlClient(
                f"engine-{os.getpid()}", staging_bytes=cfg.staging_bytes, timeout_s=cfg.timeout_s, pin=pin
            )
            self.nixl = client if client.one_sided else None  # no NIXL here: every shard over Ray

    def _discover(self) -> dict[str, object]:
        import ray
        from ray.util import list_named_actors

        names = [
            a["name"]
            for a in list_named_actors(all_namespaces=True)
            if a.get("namespace") == self.namespace and a["name"].startswith(SHARD_PREFIX)
        ]
        handles = {}
        for name in sorted(names):
            try:
                handles[name] = ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                continue  # died between listing and lookup
        return handles

    def _call(self, session: str, method: str, *args, default):
        if time.monotonic() - self._seen > self.refresh_s:
            self._seen = time.monotonic()
            self.replace_shards(self._discover())
        return super()._call(session, method, *args, default=default)

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

    def read(self, session: str, hashes: list[str]) -> ReadLease:
        if not hashes or not self.shards:
            return ReadLease(hashes, [], nothing)
        if self.nixl is None:
            blobs = super().get(session, hashes)

            def release(bad: list[str]) -> None:
                if bad:
                    self.report_corrupt(session, bad)

            return ReadLease(hashes, blobs, release)
        name = self.ring.owner(session)  # one-sided READ, Ray bytes for what cannot go that way
        return self.nixl.read(self.shards[name], hashes, name=name)

    def open_write(self, session: str, metas: list[BlockMeta], size: int) -> WriteLease:
        if self.nixl is not None and self.shards:
            name = self.ring.owner(session)
            return self.nixl.open_write(self.shards[name], metas, size, name=name)
        buf = host_buffer(size * len(metas), self.pin)
        views = [memoryview(buf[i * size : (i + 1) * size]) for i in range(len(metas))]

        def commit(ok: list[bool]) -> int:
            chosen = [(m, bytes(v)) for m, v, o in zip(metas, views, ok, strict=True) if o]
            if not chosen:
                return 0
            return super(RayStore, self).put(session, [m for m, _ in chosen], [b for _, b in chosen])

        return WriteLease(metas, list(views), commit, (buf, [i * size for i in range(len(metas))]))


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
