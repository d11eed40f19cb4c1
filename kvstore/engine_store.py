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
            from kvstore.nixl_client import NixlClient

            client = NixlClient(
                f"engine-{os.getpid()}", staging_bytes=cfg.staging_bytes, timeout_s=cfg.timeout_s
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
        if self.nixl is None or not self.shards:
            return super().get(session, hashes)
        name = self.ring.owner(session)  # one-sided READ, Ray bytes for what cannot go that way
        return self.nixl.get(self.shards[name], hashes, name=name)

    def put(self, session: str, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        if self.nixl is None or not self.shards:
            return super().put(session, metas, blobs)
        name = self.ring.owner(session)
        return self.nixl.put(self.shards[name], metas, blobs, name=name)


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
