"""The KV-state store's pure core: block index, tier directory, session- and reasoning-aware retention.

No ray/torch/vllm, no I/O, time passed in. The shell (a shard actor) moves the bytes; this core says
where they go and in what order they leave. Every change of place is two-phase: `prepare_*` reserves
slots and returns what to copy, `complete_*(ok)` commits or rolls back, so a failed copy never leaves
the index pointing at bytes that are not there.

Retention, most expendable first (each class in least-recently-used order):
  0 doomed   blocks of early-exited or finished sessions (a Tree-of-Thought search's pruned branches
             are not told apart: a node's children share one engine request, so one set of tags;
             they go with the session's exit)
  1 idle     sessions not touched within the retention window
  2 old      rounds n-2 and older of a session whose current round is n
  3 hot      the current and the previous round
RAM makes room, when a put needs it, by demoting to disk (classes 1-3) or dropping (class 0); disk
makes room by dropping.
Pinned blocks (being read) never move.

Session entries are bounded too: an exited session is forgotten when its last block leaves (at once if
it holds none), and one that holds no blocks is forgotten once idle past the retention window.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from dataclasses import dataclass
from enum import IntEnum, StrEnum

EVENTS_KEPT = 4096


class Tier(StrEnum):
    RAM = "ram"
    DISK = "disk"


class State(StrEnum):
    PENDING = "pending"  # a put reserved its slot; bytes not yet written
    READY = "ready"
    MOVING = "moving"  # a demotion reserved a disk slot; bytes being copied


class Retention(IntEnum):
    DOOMED = 0
    IDLE = 1
    OLD = 2
    HOT = 3


@dataclass
class Block:
    hash: str
    session: str
    round: int
    branch: str
    nbytes: int
    tier: Tier
    slot: int
    state: State = State.PENDING
    refs: int = 0
    last_used: float = 0.0


@dataclass
class Session:
    current_round: int = 0
    seen: float = 0.0
    exited: bool = False
    blocks: int = 0  # blocks in the index tagged with this session


@dataclass(frozen=True)
class Move:
    hash: str
    src: tuple[Tier, int]
    dst: tuple[Tier, int]


@dataclass(frozen=True)
class Placement:
    """Where a new block goes, and what must happen first to free that slot."""

    tier: Tier
    slot: int
    demote: Move | None = None  # copy this block RAM -> disk before writing the new one
    dropped: tuple[str, ...] = ()  # blocks evicted to make room (their slots are reused)


class StoreFull(Exception):
    """No slot can be freed: every block is pinned or mid-move."""


class KvCore:
    def __init__(self, slots: dict[Tier, int], slot_bytes: int, retention_window_s: float = 600.0) -> None:
        self.slot_bytes = slot_bytes
        self.window = retention_window_s
        # Free slots as min-heaps: a batch of puts takes the lowest free slots, so a round's chunks
        # usually sit in consecutive slots and a loader moves them with one strided copy per layer.
        self.free: dict[Tier, list[int]] = {t: list(range(n)) for t, n in slots.items()}
        self.capacity = dict(slots)
        self.blocks: dict[str, Block] = {}
        self.sessions: dict[str, Session] = {}
        # The latest events (kind, block hash, detail) for inspection, and running counts by
        # (kind, detail) for metrics: bounded, a long-running shard must not grow without end.
        self.events: deque[tuple[str, str, str]] = deque(maxlen=EVENTS_KEPT)
        self.counts: Counter[tuple[str, str]] = Counter()

    # --- retention ---------------------------------------------------------------------------

    def retention(self, b: Block, now: float) -> Retention:
        s = self.sessions.get(b.session)
        if s is None or s.exited:
            return Retention.DOOMED
        if now - s.seen > self.window:
            return Retention.IDLE
        if b.round <= s.current_round - 2:
            return Retention.OLD
        return Retention.HOT

    def eviction_order(self, tier: Tier, now: float) -> list[str]:
        """Movable blocks of a tier, most expendable first."""
        movable = [
            b for b in self.blocks.values() if b.tier is tier and b.state is State.READY and not b.refs
        ]
        movable.sort(key=lambda b: (self.retention(b, now), b.last_used, b.round, b.hash))
        return [b.hash for b in movable]

    def _session(self, name: str, now: float) -> Session:
        s = self.sessions.setdefault(name, Session())
        s.seen = max(s.seen, now)
        return s

    def mark_round(self, session: str, round_: int, now: float) -> None:
        s = self._session(session, now)
        s.current_round = max(s.current_round, round_)

    def mark_exited(self, session: str, now: float) -> None:
        """The session's loop exited early: its trace is kept only while nothing else needs room."""
        self._session(session, now).exited = True
        self._forget_if_done(session)

    def _forget_if_done(self, session: str) -> None:
        s = self.sessions.get(session)
        if s is not None and s.exited and not s.blocks:
            del self.sessions[session]

    def forget_idle(self, now: float) -> int:
        """Forget sessions that hold no blocks and were not touched within the retention window
        (e.g. a hint that came after the session's end); returns how many."""
        idle = [n for n, s in self.sessions.items() if not s.blocks and now - s.seen > self.window]
        for n in idle:
            del self.sessions[n]
        return len(idle)

    def finish_session(self, session: str) -> list[tuple[str, Tier, int]]:
        """Bulk evict a finished session; returns the freed (hash, tier, slot) for the shell."""
        freed = []
        for b in [b for b in self.blocks.values() if b.session == session and not b.refs]:
            freed.append((b.hash, b.tier, b.slot))
            self._drop(b, "session_finished")
        if not any(b.session == session for b in self.blocks.values()):
            self.sessions.pop(session, None)
        return freed

    # --- puts --------------------------------------------------------------------------------

    def prepare_put(
        self, block_hash: str, *, session: str, round_: int, branch: str, nbytes: int, now: float
    ) -> Placement | None:
        """Reserve a RAM slot for a new block; None when the store already has it."""
        if nbytes > self.slot_bytes:
            raise ValueError(f"block of {nbytes} bytes exceeds the {self.slot_bytes}-byte slot")
        if block_hash in self.blocks:
            self.blocks[block_hash].last_used = now
            return None
        s = self._session(session, now)
        demote, dropped = None, []
        if not self.free[Tier.RAM]:
            demote, dropped = self._make_room_in_ram(now)
        slot = heapq.heappop(self.free[Tier.RAM])
        self.blocks[block_hash] = Block(
            block_hash, session, round_, branch, nbytes, Tier.RAM, slot, last_used=now
        )
        # Making room may have forgotten this very session (exited, its last block dropped).
        self.sessions.setdefault(session, s).blocks += 1
        return Placement(Tier.RAM, slot, demote, tuple(dropped))

    def complete_put(self, block_hash: str, ok: bool) -> None:
        b = self.blocks.get(block_hash)
        if b is None or b.state is not State.PENDING:
            return
        if ok:
            b.state = State.READY
            self._event("save", block_hash, b.tier.value)
        else:
            self._drop(b, "put_failed")

    def _make_room_in_ram(self, now: float) -> tuple[Move | None, list[str]]:
        order = self.eviction_order(Tier.RAM, now)
        if not order:
            raise StoreFull("every RAM block is pinned or moving")
        victim = self.blocks[order[0]]
        if self.retention(victim, now) is Retention.DOOMED or Tier.DISK not in self.free:
            self._drop(victim, "doomed" if self.retention(victim, now) is Retention.DOOMED else "ram_full")
            return None, [victim.hash]
        dropped: list[str] = []
        if not self.free[Tier.DISK]:
            disk_order = self.eviction_order(Tier.DISK, now)
            if not disk_order:
                self._drop(victim, "ram_full")
                return None, [victim.hash]
            dropped.append(disk_order[0])
            self._drop(self.blocks[disk_order[0]], "disk_full")
        dst = heapq.heappop(self.free[Tier.DISK])
        move = Move(victim.hash, (Tier.RAM, victim.slot), (Tier.DISK, dst))
        # The RAM slot is handed to the new block now; the shell copies the victim out first.
        heapq.heappush(self.free[Tier.RAM], victim.slot)
        victim.tier, victim.slot, victim.state = Tier.DISK, dst, State.MOVING
        return move, dropped

    def complete_demote(self, block_hash: str, ok: bool) -> None:
        b = self.blocks.get(block_hash)
        if b is None or b.state is not State.MOVING:
            return
        if ok:
            b.state = State.READY
            self._event("demote", block_hash, "ram->disk")
        else:
            self._drop(b, "demote_failed")

    # --- gets --------------------------------------------------------------------------------

    def lookup_prefix(self, hashes: list[str]) -> int:
        """How many leading blocks of a prompt's chain the store holds, ready to load."""
        n = 0
        for h in hashes:
            b = self.blocks.get(h)
            if b is None or b.state is not State.READY:
                break
            n += 1
        return n

    def prepare_get(self, hashes: list[str], now: float) -> list[tuple[str, Tier, int]]:
        """Pin the leading ready blocks for reading; unpin with complete_get."""
        out = []
        for h in hashes[: self.lookup_prefix(hashes)]:
            b = self.blocks[h]
            b.refs += 1
            b.last_used = now
            self._session(b.session, now)
            out.append((h, b.tier, b.slot))
        return out

    def complete_get(self, hashes: list[str], ok: bool) -> None:
        """Unpin; a failed read (bad checksum, short read) drops the block: it is recomputed."""
        for h in hashes:
            b = self.blocks.get(h)
            if b is None or b.refs == 0:
                continue
            b.refs -= 1
            self._event("load" if ok else "load_failed", h, b.tier.value)
            if not ok and b.refs == 0:
                self._drop(b, "corrupt")

    # --- bookkeeping -------------------------------------------------------------------------

    def _drop(self, b: Block, reason: str) -> None:
        del self.blocks[b.hash]
        heapq.heappush(self.free[b.tier], b.slot)
        s = self.sessions.get(b.session)
        if s is not None:
            s.blocks -= 1
            self._forget_if_done(b.session)
        self._event("evict", b.hash, reason)

    def _live(self, session: str) -> bool:
        s = self.sessions.get(session)
        return s is not None and not s.exited

    def _event(self, kind: str, block_hash: str, detail: str) -> None:
        self.events.append((kind, block_hash, detail))
        self.counts[(kind, detail)] += 1

    def stats(self) -> dict:
        used = {t: self.capacity[t] - len(self.free[t]) for t in self.capacity}
        return {
            "blocks": len(self.blocks),
            "sessions": len(self.sessions),
            "slots_used": {t.value: n for t, n in used.items()},
            "slots_total": {t.value: n for t, n in self.capacity.items()},
            "bytes_stored": sum(b.nbytes for b in self.blocks.values()),
            "pinned": sum(1 for b in self.blocks.values() if b.refs),
            "pending": sum(1 for b in self.blocks.values() if b.state is not State.READY),
            # Sessions not yet marked exited, and their blocks (exited sessions' blocks are kept as
            # a cache, first to go when room is needed): what a finished workload leaves behind.
            "live_sessions": sum(1 for s in self.sessions.values() if not s.exited),
            "live_blocks": sum(1 for b in self.blocks.values() if self._live(b.session)),
            "events": {f"{k}:{d}": n for (k, d), n in sorted(self.counts.items())},
        }
