"""The store as seen from inside a vLLM engine process: the cluster's shards, or a local shard.

vLLM runs its engine core (scheduler and, by default, the model worker) in a process it spawns
itself, which is not a Ray worker. To reach the shard actors that process joins the cluster as a
Ray driver (`ray.init(address=<GCS>)`, once per process) and finds the shards by name. Both
connector roles of one process share one store (`shared_store`).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from kvstore.client import SHARD_PREFIX, StoreClient
from kvstore.connector_config import KvConnectorConfig
from kvstore.shard import BlockMeta, Shard, ShardConfig

log = logging.getLogger("ponder.kvstore")

_lock = threading.Lock()
_stores: dict[str, object] = {}


class LocalStore:
    """One in-process shard behind the StoreClient interface."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.shard = Shard(ShardConfig(ram_slots=slots, slot_bytes=slot_bytes))

    def lookup(self, session: str, hashes: list[str]) -> int:
        return self.shard.lookup(hashes)

    def get(self, session: str, hashes: list[str]) -> list[bytes]:
        return self.shard.get(hashes)

    def put(self, session: str, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        return self.shard.put(metas, blobs)

    def report_corrupt(self, session: str, hashes: list[str]) -> None:
        self.shard.report_corrupt(hashes)

    def notify(self, session: str, method: str, *args) -> None:
        getattr(self.shard, method)(*args)


class RayStore(StoreClient):
    """The cluster's shards, rediscovered every `refresh_s` (shards join with nodes)."""

    def __init__(self, cfg: KvConnectorConfig, refresh_s: float = 10.0) -> None:
        import ray

        if not ray.is_initialized():
            t0 = time.perf_counter()
            ray.init(address=cfg.ray_address or "auto", namespace=cfg.namespace, log_to_driver=False)
            log.info("engine process joined the Ray cluster in %.1f s", time.perf_counter() - t0)
        self.namespace, self.refresh_s = cfg.namespace, refresh_s
        super().__init__(self._discover(), timeout_s=cfg.timeout_s)
        self._seen = time.monotonic()
        self.nixl = None
        if cfg.transport == "nixl":
            try:
                from kvstore.nixl_path import NixlPath

                self.nixl = NixlPath(f"engine-{os.getpid()}", cfg.staging_bytes, cfg.timeout_s)
            except Exception as exc:  # no NIXL here: every shard is reached over Ray
                log.warning("KV store: NIXL unavailable (%s); moving blocks over Ray", exc)

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

    def _one_sided(self, session: str, method: str, *args):
        """The NIXL path for the session's shard, or None (then the bytes path runs)."""
        if self.nixl is None or not self.shards:
            return None
        name = self.ring.owner(session)
        try:
            return getattr(self.nixl, method)(name, self.shards[name], *args)
        except Exception as exc:  # the shard died or timed out: let the bytes path find out and drop it
            log.warning("kv shard %s: NIXL %s failed (%s)", name, method, type(exc).__name__)
            return None

    def get(self, session: str, hashes: list[str]) -> list[bytes]:
        got = self._one_sided(session, "get", hashes)
        if got is None:
            return super().get(session, hashes)
        if len(got) < len(hashes):  # the rest may sit on the shard's disk tier: bytes path
            got += super().get(session, hashes[len(got) :])
        return got

    def put(self, session: str, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        done = self._one_sided(session, "put", metas, blobs)
        return super().put(session, metas, blobs) if done is None else done


def shared_store(cfg: KvConnectorConfig, slot_bytes: int) -> object:
    """This process's store for `cfg` (created on first use)."""
    key = f"{cfg.store}|{cfg.ray_address}|{cfg.namespace}"
    with _lock:
        if key not in _stores:
            if cfg.store == "local":
                _stores[key] = LocalStore(cfg.local_ram_slots, slot_bytes)
            else:
                _stores[key] = RayStore(cfg)
        return _stores[key]
