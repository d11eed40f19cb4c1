"""The shard keeper: one detached actor per cluster that keeps a shard on every live node and has
each shard re-set its metrics.

Nodes join after the app starts (KubeRay's worker pods, autoscaling), so shards cannot be created
once at start-up: the keeper looks every `every_s` and starts the missing ones (`start_shards` is
idempotent). Ray drops a gauge ~25 s after its last set, so the same pass asks every shard to
`publish` — once per cluster, not once per router replica. A shard's calls run on the shard's own
thread; the keeper only sends them.
"""

from __future__ import annotations

import logging
import threading

from kvstore.shard.client import alive_nodes, find_shards, shard_name, start_shards
from kvstore.shard.shard import ShardConfig

log = logging.getLogger("ponder.kvstore")

KEEPER_SUFFIX = "-kv-keeper"


def keeper_name(prefix: str) -> str:
    """The keeper's actor name beside the app's other named actors (`prefix`: e.g. "ponder")."""
    return f"{prefix}{KEEPER_SUFFIX}"


class ShardKeeper:
    def __init__(self, cfg: dict, namespace: str, every_s: float = 5.0) -> None:
        self.cfg = ShardConfig.model_validate(cfg)
        self.namespace, self.every_s = namespace, every_s
        self._lock = threading.Lock()
        self.passes = 0
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="ponder-kv-keeper", daemon=True).start()

    def reconcile(self) -> list[str]:
        """Start a shard on each live node that has none; ask every shard to publish. Returns the
        shards' names (the caller may wait for this once: the shards exist before serving starts)."""
        with self._lock:
            present = find_shards(self.namespace)
            missing = [n for n in alive_nodes() if shard_name(n) not in present]
            if missing:
                log.info("starting kv shards on %d node(s)", len(missing))
                present.update(start_shards(self.cfg, missing, self.namespace))
            for handle in present.values():
                try:
                    handle.publish.remote()  # fire and forget: a dead shard just misses one pass
                except Exception as exc:
                    log.debug("kv publish dropped: %s", exc)
            self.passes += 1
            return sorted(present)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.reconcile()
            except Exception:  # never let one bad pass end the loop (e.g. GCS briefly away)
                log.exception("kv keeper pass failed")

    def stats(self) -> dict:
        return {"passes": self.passes, "every_s": self.every_s}


def start_keeper(cfg: ShardConfig, namespace: str, name: str, head_resource: str | None = None) -> object:
    """The keeper (created once, found afterwards) after one reconcile: the shards exist on return."""
    import ray

    options = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "lifetime": "detached",
        "max_restarts": -1,
        "num_cpus": 0,
    }
    if head_resource:
        options["resources"] = {head_resource: 0.001}
    keeper = ray.remote(ShardKeeper).options(**options).remote(cfg.model_dump(), namespace)
    ray.get(keeper.reconcile.remote())
    return keeper
