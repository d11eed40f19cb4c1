"""Shard actors on Ray, one per node, and the client routers and workers use.

A session's blocks live on the shard its id hashes to (kvstore/ring.py), so a round's prefix is one
batched call. The store is a cache: a shard that cannot be reached (its node left, it is
restarting) is a miss — the caller recomputes — never an error. When shards come or go, the ring
is rebuilt and the sessions that moved start cold on their new shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvstore.ring import HashRing
from kvstore.shard.shard import BlockMeta, ShardConfig

log = logging.getLogger("ponder.kvstore")

SHARD_PREFIX = "ponder-kv-shard-"


def shard_name(node_id: str) -> str:
    return f"{SHARD_PREFIX}{node_id[:12]}"


def alive_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def start_shards(cfg: ShardConfig, node_ids: list[str], namespace: str) -> dict[str, object]:
    """One shard actor pinned to each node (hard affinity: a shard's RAM is that node's RAM), named
    in `namespace` (the app's depth_control.namespace: the connectors look for shards there)."""
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
            namespace=namespace,
            get_if_exists=True,
            lifetime="detached",  # owned by no process: a router or keeper restart keeps the cache
            num_cpus=0,
            max_restarts=0,  # a shard's bytes die with its node; a restart would be empty anyway
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(node_cfg)
    return handles


def find_shards(namespace: str) -> dict[str, object]:
    """The live shard actors in `namespace`, by name (whoever started them: services/provision.py)."""
    import ray
    from ray.util import list_named_actors

    names = [
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace and a["name"].startswith(SHARD_PREFIX)
    ]
    handles = {}
    for name in sorted(names):
        try:
            handles[name] = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue  # died between listing and lookup
    return handles


class StoreClient:
    """Calls to the shard that owns a session. With `discover` (e.g. `find_shards` bound to a
    namespace), the shard set is looked up again every `refresh_s`: shards come and go with nodes."""

    def __init__(
        self,
        shards: dict[str, object],
        timeout_s: float = 5.0,
        discover: Callable[[], dict[str, object]] | None = None,
        refresh_s: float = 10.0,
    ) -> None:
        self.shards = dict(shards)
        self.ring = HashRing(self.shards)
        self.timeout = timeout_s
        self.misses_from_faults = 0
        self.discover, self.refresh_s, self._seen = discover, refresh_s, time.monotonic()

    def _refresh(self) -> None:
        if self.discover is not None and time.monotonic() - self._seen > self.refresh_s:
            self._seen = time.monotonic()
            self.replace_shards(self.discover())

    def _call(self, session: str, method: str, *args, default):
        import ray

        self._refresh()
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

    # Retention hints (kvstore/core.py): fire and forget, never wait, never fail the caller.

    def mark_round(self, session: str, round_: int) -> None:
        """The session's current round: rounds n-2 and older may be demoted."""
        self._hint(session, lambda shard: shard.mark_round.remote(session, round_))

    def mark_exited(self, session: str) -> None:
        """The session's request ended: its blocks stay as a cache that goes first."""
        self._hint(session, lambda shard: shard.mark_exited.remote(session))

    def _hint(self, session: str, call) -> None:
        self._refresh()
        if not self.shards:
            return
        try:
            call(self.shards[self.ring.owner(session)])
        except Exception as exc:  # a hint lost is a block kept a little longer
            log.debug("kv hint for %s dropped: %s", session, exc)

    def report_corrupt(self, session: str, hashes: list[str]) -> None:
        if self.shards:
            self._call(session, "report_corrupt", hashes, default=None)
