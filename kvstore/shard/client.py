"""Shard actors on Ray, one per node, and the client routers and workers use.

A session's blocks live on the shard its id hashes to (kvstore/ring.py), so a round's prefix is one
batched call. The store is a cache: a shard that cannot be reached (its node left, it is
restarting) is a miss — the caller recomputes — never an error. When shards come or go, the ring
is rebuilt and the sessions that moved start cold on their new shard.
"""

from __future__ import annotations

import logging

from kvstore.ring import HashRing
from kvstore.shard.shard import BlockMeta, ShardConfig

log = logging.getLogger("ponder.kvstore")

NAMESPACE = "ponder"
SHARD_PREFIX = "ponder-kv-shard-"


def shard_name(node_id: str) -> str:
    return f"{SHARD_PREFIX}{node_id[:12]}"


def alive_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def start_shards(cfg: ShardConfig, node_ids: list[str]) -> dict[str, object]:
    """One shard actor pinned to each node (hard affinity: a shard's RAM is that node's RAM)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kvstore.shard.actor import ShardActor

    actor = ray.remote(ShardActor)
    handles = {}
    for node in node_ids:
        name = shard_name(node)
        node_cfg = cfg  # a disk path may name its node: "{node}" (several nodes can share a machine)
        if cfg.disk_path:
            node_cfg = cfg.model_copy(update={"disk_path": cfg.disk_path.replace("{node}", node[:12])})
        handles[name] = actor.options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            num_cpus=0,
            max_restarts=0,  # a shard's bytes die with its node; a restart would be empty anyway
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(node_cfg)
    return handles


class StoreClient:
    def __init__(self, shards: dict[str, object], timeout_s: float = 5.0) -> None:
        self.shards = dict(shards)
        self.ring = HashRing(self.shards)
        self.timeout = timeout_s
        self.misses_from_faults = 0

    def _call(self, session: str, method: str, *args, default):
        import ray

        name = self.ring.owner(session)
        try:
            return ray.get(getattr(self.shards[name], method).remote(*args), timeout=self.timeout)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # RayActorError, GetTimeoutError, ...
            log.warning("kv shard %s unavailable (%s): treating as a miss", name, type(exc).__name__)
            self.misses_from_faults += 1
            self.drop_shard(name)
            return default

    def drop_shard(self, name: str) -> None:
        """Forget a dead shard: its sessions rehash to the others and start cold there."""
        if name in self.shards:
            del self.shards[name]
            self.ring.remove(name)

    def replace_shards(self, shards: dict[str, object]) -> None:
        """Adopt a fresh view of the live shards (sessions whose owner changed start cold)."""
        if set(shards) != set(self.shards):
            log.info("kv shards now %s", sorted(shards))
            self.shards = dict(shards)
            self.ring = HashRing(self.shards)

    def put(self, session: str, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        if not self.shards:
            return 0
        return self._call(session, "put", metas, blobs, default=0)

    def lookup(self, session: str, hashes: list[str]) -> int:
        return self._call(session, "lookup", hashes, default=0) if self.shards else 0

    def get(self, session: str, hashes: list[str]) -> list[bytes]:
        return self._call(session, "get", hashes, default=[]) if self.shards else []

    def notify(self, session: str, method: str, *args) -> None:
        """Fire and forget (retention hints): never waits, never fails the caller."""
        if not self.shards:
            return
        try:
            getattr(self.shards[self.ring.owner(session)], method).remote(*args)
        except Exception as exc:  # a hint lost is a block kept a little longer
            log.debug("kv hint %s for %s dropped: %s", method, session, exc)

    def notify_all(self, method: str, *args) -> None:
        """Fire and forget to every shard (e.g. `publish` metrics)."""
        for handle in list(self.shards.values()):
            try:
                getattr(handle, method).remote(*args)
            except Exception as exc:
                log.debug("kv %s dropped: %s", method, exc)

    def report_corrupt(self, session: str, hashes: list[str]) -> None:
        if self.shards:
            self._call(session, "report_corrupt", hashes, default=None)
