"""Consistent-hash sharding of sessions over store shards (pure).

A session's blocks live on one shard, so a round's whole prefix is one batched call away. Each shard
owns `vnodes` points on a 64-bit ring (blake2b, stable across processes and Python versions, unlike
hash()); a session belongs to the first point at or after its own hash. When a shard joins or leaves
only the sessions between its points and their neighbours move: `moves` lists them.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable


def _h(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, shards: Iterable[str] = (), vnodes: int = 64) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be at least 1")
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owner: dict[int, str] = {}
        self.shards: set[str] = set()
        for s in shards:
            self.add(s)

    def add(self, shard: str) -> None:
        if shard in self.shards:
            return
        self.shards.add(shard)
        for i in range(self.vnodes):
            p = _h(f"{shard}#{i}")
            if p in self._owner:  # a 64-bit collision: keep the first owner, deterministically
                continue
            self._owner[p] = shard
            bisect.insort(self._points, p)

    def remove(self, shard: str) -> None:
        if shard not in self.shards:
            return
        self.shards.discard(shard)
        gone = [p for p, s in self._owner.items() if s == shard]
        for p in gone:
            del self._owner[p]
        self._points = sorted(self._owner)

    def owner(self, session: str) -> str:
        if not self._points:
            raise LookupError("no shards in the ring")
        i = bisect.bisect_left(self._points, _h(session)) % len(self._points)
        return self._owner[self._points[i]]

    def copy(self) -> HashRing:
        return HashRing(self.shards, self.vnodes)


def moves(before: HashRing, after: HashRing, sessions: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Sessions whose owner changes between two rings: session -> (old shard, new shard)."""
    out = {}
    for s in sessions:
        a, b = before.owner(s), after.owner(s)
        if a != b:
            out[s] = (a, b)
    return out
