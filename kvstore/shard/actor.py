"""The shard as a Ray actor: `Shard` plus its Prometheus metrics (Ray's metrics API, `ray_ponder_kv_*`).

`publish` is called periodically by the shard keeper (kvstore metrics must be re-set: Ray drops a gauge
~25 s after its last set) and runs on the actor's own thread like every other call, so it never
reads the index while a put changes it.
"""

from __future__ import annotations

from collections import Counter

from kvstore.shard.shard import Shard, ShardConfig


class ShardActor(Shard):
    """A shard as Ray runs it: `Shard` (with its NIXL data path) plus metrics."""

    def __init__(self, cfg: ShardConfig) -> None:
        super().__init__(cfg)
        self._metrics_ready = False
        self._seen: Counter[tuple[str, str]] = Counter()
        self._seen_rejected = 0

    def _make_metrics(self) -> None:
        from ray.util import metrics

        self._blocks = metrics.Gauge("ponder_kv_blocks", "Blocks held by KV shards.", tag_keys=("tier",))
        self._bytes = metrics.Gauge("ponder_kv_bytes", "Encoded bytes held by KV shards.", tag_keys=("tier",))
        self._slots = metrics.Gauge(
            "ponder_kv_slots", "KV shard slots, used and total.", tag_keys=("tier", "state")
        )
        self._sessions = metrics.Gauge("ponder_kv_sessions", "Sessions with blocks in KV shards.")
        self._events = metrics.Counter(
            "ponder_kv_events",
            "KV shard events: save/load/load_failed by tier, demote, evict by reason.",
            tag_keys=("kind", "detail"),
        )
        self._rejected = metrics.Counter("ponder_kv_rejected_blocks", "Blocks a shard declined (too big).")
        self._metrics_ready = True

    def publish(self) -> dict:
        if not self._metrics_ready:
            self._make_metrics()  # inside the actor, on first use (not at import)
        self.core.forget_idle(self.clock())  # periodic, also when no NIXL call runs `sweep`
        st = self.stats()
        for tier, total in st["slots_total"].items():
            used = st["slots_used"].get(tier, 0)
            self._slots.set(used, tags={"tier": tier, "state": "used"})
            self._slots.set(total, tags={"tier": tier, "state": "total"})
            blocks = [b for b in self.core.blocks.values() if b.tier.value == tier]
            self._blocks.set(len(blocks), tags={"tier": tier})
            self._bytes.set(sum(b.nbytes for b in blocks), tags={"tier": tier})
        self._sessions.set(st["sessions"])
        for key, n in self.core.counts.items():
            if n > self._seen[key]:
                self._events.inc(n - self._seen[key], tags={"kind": key[0], "detail": key[1]})
                self._seen[key] = n
        if self.rejected > self._seen_rejected:
            self._rejected.inc(self.rejected - self._seen_rejected)
            self._seen_rejected = self.rejected
        return st
