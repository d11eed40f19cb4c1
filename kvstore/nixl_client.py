"""A process's one-sided path to store shards: block bytes move by NIXL READ/WRITE, only offsets by Ray.

`NixlClient` owns one registered staging buffer and a NIXL agent. Per shard (cached by name, or the
Ray actor's id) it fetches `transport_metadata` once, connects, and warms the connection up with one
small READ (UCX sets a connection up on first use: 40-60 ms). Then:

- `get(shard, hashes)`: `pin_for_read` (offsets of the leading RAM-tier blocks), one batched READ of
  all spans into staging, `finish_read` (not waited for: Ray runs one caller's calls to an actor in
  order), copies out; the blocks after the RAM prefix (disk tier) come with the shard's `get`.
- `put(shard, metas, blobs)`: `reserve_for_write`, the blocks copied into staging, one batched WRITE,
  `commit_write` (waited for: the next round, anywhere, must find them).

The store is a cache, so nothing here raises for a shard or transport problem: a failed transfer
falls back to the shard's Ray-bytes `get`/`put` (logged once per shard; the shard is retried one-sided
after `retry_s`), a shard that cannot be reached is a miss (`[]`, `0`). A batch larger than the
staging buffer grows it (re-registering; up to `max_staging_bytes`) or goes over Ray. Without NIXL
importable, or against a shard with `transport: bytes`, everything goes over Ray.

A shard handle is a Ray actor handle (methods called with `.remote`) or, for tests and single-process
use, a plain `kvstore.shard.Shard`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from kvstore.transport import Transport, TransportError, decode_metadata, make_transport

log = logging.getLogger("ponder.kvstore")

MiB = 1 << 20
_WARMUP_BYTES = 64


class NixlClient:
    def __init__(
        self,
        name: str | None = None,
        staging_bytes: int = 32 * MiB,
        max_staging_bytes: int = 512 * MiB,
        timeout_s: float = 5.0,
        retry_s: float = 30.0,
        prefer: str = "nixl",
    ) -> None:
        self.name = name or f"kvclient-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.staging_bytes, self.max_staging_bytes = staging_bytes, max(staging_bytes, max_staging_bytes)
        self.timeout, self.retry_s, self.prefer = timeout_s, retry_s, prefer
        self.transport: Transport | None = None
        self.staging: np.ndarray | None = None
        self._gen = 0
        self._peers: dict[str, str | None] = {}  # shard key -> NIXL peer name; None: bytes only
        self._metadata: dict[str, bytes] = {}  # shard key -> its metadata (reconnect after a regrow)
        self._retry_at: dict[str, float] = {}  # shard key -> when to try one-sided again
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # one transfer at a time: they share the staging buffer
        self.stats = {"nixl_gets": 0, "nixl_puts": 0, "nixl_bytes": 0, "bytes_gets": 0, "bytes_puts": 0}
        self.stats |= {"fallbacks": 0}
        self.one_sided = self._open(staging_bytes)

    # --- setup ---------------------------------------------------------------------------------

    def _open(self, size: int) -> bool:
        """A fresh agent with a registered staging buffer of `size` bytes; False: bytes only."""
        if self.transport is not None:
            self.transport.close()
        self.transport, self.staging = None, None
        self._peers.clear()  # peers are per agent: reconnect (from cached metadata) on next use
        if self.prefer != "nixl":
            return False
        self._gen += 1
        try:
            # An initiator only: no NIXL progress thread (it would spin a core in every engine).
            t = make_transport(f"{self.name}-{self._gen}", prefer="nixl", progress_thread=False)
            if not t.one_sided:
                return False
            buf = np.zeros(size, dtype=np.uint8)
            t.register(buf)
        except TransportError as e:
            log.warning("kv client: NIXL unavailable (%s); blocks move over Ray", e)
            return False
        self.transport, self.staging, self.staging_bytes = t, buf, size
        return True

    def _fits(self, nbytes: int) -> bool:
        """Whether a batch of `nbytes` fits staging, growing it (up to max_staging_bytes) if needed."""
        if self.staging is not None and nbytes <= self.staging.size:
            return True
        if nbytes > self.max_staging_bytes:
            return False
        size = self.staging_bytes
        while size < nbytes:
            size *= 2
        size = min(size, self.max_staging_bytes)
        log.info("kv client: staging buffer %d -> %d bytes", self.staging_bytes, size)
        return self._open(size)

    @staticmethod
    def key(handle, name: str | None = None) -> str:
        if name:
            return name
        actor_id = getattr(handle, "_actor_id", None)
        return actor_id.hex() if actor_id is not None else f"local-{id(handle):x}"

    def _call(self, handle, method: str, *args):
        fn = getattr(handle, method)
        if not hasattr(fn, "remote"):
            return fn(*args)  # a local Shard
        import ray

        return ray.get(fn.remote(*args), timeout=self.timeout)

    @staticmethod
    def _tell(handle, method: str, *args) -> None:
        """Call without waiting (Ray keeps one caller's calls to an actor in order)."""
        fn = getattr(handle, method)
        if hasattr(fn, "remote"):
            fn.remote(*args)
        else:
            fn(*args)

    def peer(self, handle, name: str | None = None) -> str | None:
        """The NIXL peer of a shard, connecting (and warming up) on first use; None: use Ray bytes.

        Raises what the shard's Ray call raises (the shard is unreachable): the caller's miss.
        """
        k = self.key(handle, name)
        if self.transport is None or self._retry_at.get(k, 0.0) > time.monotonic():
            return None
        if k in self._peers:
            return self._peers[k]
        md = self._metadata.get(k)
        if md is None:
            md = self._metadata[k] = self._call(handle, "transport_metadata")
        peer = None
        try:
            if md and decode_metadata(md).nixl:
                peer = self.transport.connect(md)
                self.transport.read(peer, [(0, 0, _WARMUP_BYTES)], self.timeout)  # UCX connects now
        except TransportError as e:
            self._failed(k, e)
            return None
        self._peers[k] = peer
        return peer

    def _failed(self, k: str, exc: Exception) -> None:
        self.stats["fallbacks"] += 1
        if k not in self._warned:
            self._warned.add(k)
            log.warning("kv client: one-sided path to shard %s failed (%s); using Ray bytes", k, exc)
        else:
            log.debug("kv client: one-sided path to shard %s failed again (%s)", k, exc)
        self._peers.pop(k, None)
        self._metadata.pop(k, None)  # the shard may have re-registered: ask again next time
        self._retry_at[k] = time.monotonic() + self.retry_s

    def forget(self, handle, name: str | None = None) -> None:
        """Drop what is cached about a shard (it was removed from the ring)."""
        k = self.key(handle, name)
        self._peers.pop(k, None)
        self._metadata.pop(k, None)
        self._retry_at.pop(k, None)

    # --- data path -----------------------------------------------------------------------------

    def get(self, handle, hashes: list[str], name: str | None = None) -> list[bytes]:
        """The stored prefix of `hashes` as encoded blocks; [] when the shard cannot be reached."""
        if not hashes:
            return []
        try:
            with self._lock:
                got = self._get_one_sided(handle, hashes, self.key(handle, name), name)
            if got is None:  # no one-sided path for this shard (now)
                self.stats["bytes_gets"] += 1
                return list(self._call(handle, "get", hashes))
        except Exception as e:  # the shard died or timed out: a miss, the caller recomputes
            k = self.key(handle, name)
            log.warning("kv client: shard %s unreachable (%s): a miss", k, type(e).__name__)
            return []
        if len(got) < len(hashes):  # the rest may be on the disk tier
            try:
                got += self._call(handle, "get", hashes[len(got) :])
            except Exception as e:  # what was read stays a valid prefix
                log.warning("kv client: shard %s: rest of a get failed (%s)", name, type(e).__name__)
        return got

    def _get_one_sided(self, handle, hashes: list[str], k: str, name: str | None) -> list[bytes] | None:
        peer = self.peer(handle, name)
        if peer is None:
            return None
        pinned: list[tuple[str, int, int]] = [tuple(p) for p in self._call(handle, "pin_for_read", hashes)]
        if not pinned:
            return []
        total = sum(n for _, _, n in pinned)
        if not self._fits(total):
            self._tell(handle, "finish_read", [h for h, _, _ in pinned], True)
            return None
        peer = self.peer(handle, name)  # a regrow reconnects (from cached metadata)
        spans, local = [], 0
        for _, remote, n in pinned:
            spans.append((remote, local, n))
            local += n
        try:
            if peer is None:
                raise TransportError("no NIXL peer after growing the staging buffer")
            self.transport.read(peer, spans, self.timeout)
        except TransportError as e:
            self._tell(handle, "finish_read", [h for h, _, _ in pinned], True)  # our failure, not theirs
            self._failed(k, e)
            return None
        out = [self.staging[lo : lo + n].tobytes() for _, lo, n in spans]
        self._tell(handle, "finish_read", [h for h, _, _ in pinned], True)
        self.stats["nixl_gets"] += 1
        self.stats["nixl_bytes"] += total
        return out

    def put(self, handle, metas: Sequence, blobs: Sequence[bytes], name: str | None = None) -> int:
        """Save blocks on the shard; returns how many were new (0 when it cannot be reached)."""
        if not metas:
            return 0
        try:
            with self._lock:
                done = self._put_one_sided(handle, list(metas), list(blobs), self.key(handle, name), name)
            if done is None:
                self.stats["bytes_puts"] += 1
                return int(self._call(handle, "put", list(metas), list(blobs)))
            return done
        except Exception as e:
            k = self.key(handle, name)
            log.warning("kv client: shard %s unreachable (%s): not saved", k, type(e).__name__)
            return 0

    def _put_one_sided(self, handle, metas: list, blobs: list[bytes], k: str, name: str | None) -> int | None:
        if self.transport is None or len(metas) != len(blobs) or not self._fits(sum(len(b) for b in blobs)):
            return None
        peer = self.peer(handle, name)
        if peer is None:
            return None
        places = self._call(handle, "reserve_for_write", metas, [len(b) for b in blobs])
        hashes, spans, local = [], [], 0
        for meta, blob, place in zip(metas, blobs, places, strict=True):
            if place is None:
                continue
            remote = place[1] if isinstance(place, (tuple, list)) else int(place)
            n = len(blob)
            self.staging[local : local + n] = np.frombuffer(blob, dtype=np.uint8)
            hashes.append(meta.hash)
            spans.append((remote, local, n))
            local += n
        if not spans:
            return 0
        try:
            self.transport.write(peer, spans, self.timeout)
        except TransportError as e:
            self._call(handle, "commit_write", hashes, False)  # free the slots, then put as bytes
            self._failed(k, e)
            return None
        done = int(self._call(handle, "commit_write", hashes, True))
        self.stats["nixl_puts"] += 1
        self.stats["nixl_bytes"] += local
        return done

    def close(self) -> None:
        with self._lock:
            if self.transport is not None:
                self.transport.close()
            self.transport, self.staging = None, None
            self._peers.clear()
