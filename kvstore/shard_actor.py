"""The shard as a Ray actor: `Shard` plus its Prometheus metrics (Ray's metrics API, `ray_ponder_kv_*`)
and its NIXL data path.

`publish` is called periodically by the router (kvstore metrics must be re-set: Ray drops a gauge
~25 s after its last set) and runs on the actor's own thread like every other call, so it never
reads the index while a put changes it.
"""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np

from kvstore.core import Tier
from kvstore.shard import BlockMeta, Shard, ShardConfig

RESERVATION_TTL_S = 30.0  # a writer that never commits (it died) gives its slots back after this


class ShardActor(Shard):
    """A shard as Ray runs it: metrics, and a RAM pool registered with NIXL so that engines read and
    write block bytes one-sided.

    The index stays two-phase: `pin_for_read` pins blocks and returns where their bytes are (the
    reader READs them, then `finish_read`); `reserve_for_write` places blocks and returns where to
    WRITE them (then `commit_write`). Disk-tier blocks and anything else that cannot go one-sided
    still travel as bytes through `get`/`put`.
    """

    def __init__(self, cfg: ShardConfig) -> None:
        super().__init__(cfg)
        self._metrics_ready = False
        self._seen: Counter[tuple[str, str]] = Counter()
        self._seen_rejected = 0
        self._transport = None
        self._reserved: dict[str, float] = {}  # hash -> reservation time

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

    def transport_metadata(self) -> bytes:
        """This shard's NIXL metadata (registers the pool on first use); b"" without NIXL."""
        if self._transport is None:
            from kvstore.transport import make_transport

            t = make_transport(f"kv-shard-{id(self):x}-{self.node_id()[:12]}")
            if not t.one_sided:
                return b""
            t.register(self.ram.buffer)
            self._transport = t
        return self._transport.metadata()

    def pin_for_read(self, hashes: list[str]) -> list[tuple[str, int, int]]:
        """(hash, byte offset in the RAM pool, length) of the leading stored blocks held in RAM."""
        pinned = self.core.prepare_get(hashes, self.clock())
        out = []
        for h, tier, slot in pinned:
            if tier is not Tier.RAM:
                break
            view = self.ram.read(slot)
            out.append((h, self.ram.offset(slot) + 4, len(view)))
        self.core.unpin([h for h, _, _ in pinned[len(out) :]])
        return out

    def finish_read(self, hashes: list[str], ok: bool) -> None:
        self.core.complete_get(hashes, ok)

    def reserve_for_write(self, metas: list[BlockMeta], sizes: list[int]) -> list[int | None]:
        """Where to WRITE each block (its payload offset in the pool), None for one not to send."""
        self._sweep()
        out: list[int | None] = []
        now = self.clock()
        for meta, n in zip(metas, sizes, strict=True):
            if n > self.core.slot_bytes:
                self.rejected += 1
                out.append(None)
                continue
            p = self.core.prepare_put(
                meta.hash, session=meta.session, round_=meta.round, branch=meta.branch, nbytes=n, now=now
            )
            if p is None:
                out.append(None)  # already stored
                continue
            self._demote_first(p)
            o = self.ram.offset(p.slot)
            self.ram.buffer[o : o + 4] = np.frombuffer(struct.pack("<I", n), dtype=np.uint8)
            self._reserved[meta.hash] = now
            out.append(o + 4)
        return out

    def commit_write(self, hashes: list[str], ok: bool) -> int:
        done = 0
        for h in hashes:
            if self._reserved.pop(h, None) is not None:
                self.core.complete_put(h, ok)
                done += ok
        return done

    def _sweep(self) -> None:
        self._sweep_older_than(RESERVATION_TTL_S)

    def _sweep_older_than(self, age_s: float) -> None:
        cutoff = self.clock() - age_s
        for h in [h for h, t in self._reserved.items() if t < cutoff]:
            del self._reserved[h]
            self.core.complete_put(h, False)
