"""A store shard: the pure core (kvstore/core.py) with real bytes in RAM and disk slot pools.

Plain Python, so it is tested without Ray; `remote_shard` makes it a Ray actor pinned to one node.
Blocks are opaque encoded bytes here (kvstore/codec.py, checked by whoever loads them): a shard
never interprets, unpickles or executes what it stores. A failed copy rolls its change back, so
the index never points at bytes that are not there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kvstore.core import KvCore, Placement, Tier
from kvstore.pool import DiskPool, RamPool, SlotError


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ram_slots: int = Field(256, ge=1, description="Blocks held in host RAM.")
    disk_slots: int = Field(0, ge=0, description="Blocks held on disk; 0 = no disk tier.")
    slot_bytes: int = Field(ge=4096, description="Bytes per slot (kvstore.pool.slot_bytes_for).")
    disk_path: str | None = Field(None, description="Preallocated slot file of the disk tier.")
    retention_window_s: float = Field(600.0, gt=0, description="Idle sessions' blocks go first after this.")


@dataclass(frozen=True)
class BlockMeta:
    hash: str
    session: str
    round: int
    branch: str = ""


class Shard:
    def __init__(self, cfg: ShardConfig, clock: Callable[[], float] = time.time) -> None:
        slots = {Tier.RAM: cfg.ram_slots}
        self.disk: DiskPool | None = None
        if cfg.disk_slots:
            if not cfg.disk_path:
                raise ValueError("disk_slots > 0 needs disk_path")
            slots[Tier.DISK] = cfg.disk_slots
            self.disk = DiskPool(Path(cfg.disk_path), cfg.disk_slots, cfg.slot_bytes)
        self.core = KvCore(slots, cfg.slot_bytes - 4, cfg.retention_window_s)
        self.ram = RamPool(cfg.ram_slots, cfg.slot_bytes)
        self.clock = clock
        self.rejected = 0  # blocks refused for size: a cache may decline, never fail the caller

    def put(self, metas: list[BlockMeta], blobs: list[bytes]) -> int:
        """Save blocks (a round's new ones, in order); returns how many were new."""
        saved = 0
        for meta, blob in zip(metas, blobs, strict=True):
            if len(blob) > self.core.slot_bytes:
                self.rejected += 1  # larger than a slot (e.g. a very long header): not cached
                continue
            p = self.core.prepare_put(
                meta.hash,
                session=meta.session,
                round_=meta.round,
                branch=meta.branch,
                nbytes=len(blob),
                now=self.clock(),
            )
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

    def report_corrupt(self, hashes: list[str]) -> None:
        """A loader rejected these blocks (checksum, model, layout): drop them."""
        for h in hashes:
            self.core.prepare_get([h], self.clock())
            self.core.complete_get([h], False)

    def mark_round(self, session: str, round_: int) -> None:
        self.core.mark_round(session, round_, self.clock())

    def mark_branch_pruned(self, session: str, branch: str) -> None:
        self.core.mark_branch_pruned(session, branch, self.clock())

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
