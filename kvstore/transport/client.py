"""A process's one-sided path to store shards: block bytes move by NIXL READ/WRITE, only offsets by Ray.

`NixlClient` owns one registered staging buffer (page-locked on GPU nodes, so the engine's DMAs run
from it too) and a NIXL agent. Its first half receives READs, its second half sends WRITEs, each
half with its own lock, so a load and an asynchronous save never wait for each other. Per shard
(cached by name, or the Ray actor's id) it fetches `transport_metadata` once, connects, and warms
the connection up with one small READ (UCX sets a connection up on first use: 40-60 ms). Then:

- `read(shard, hashes)` -> a lease (kvstore/connector/engine_store.py): `pin_for_read` (offsets of the leading
  RAM-tier blocks), one batched READ of all spans into the read half, views of them (no copy out);
  `release` sends `finish_read` (not waited for: Ray runs one caller's calls to an actor in order)
  and frees the half. The blocks after the RAM prefix (disk tier) come with the shard's `get`.
- `open_write(shard, metas, sizes)` -> a lease of views into the write half that the caller fills;
  `commit` runs `reserve_for_write`, one batched WRITE of the reserved ones, `commit_write` (waited
  for: the next round, anywhere, must find them).
- `get`/`put`: the same with bytes in and out (tests, benchmarks).

The store is a cache, so nothing here raises for a shard or transport problem: a failed transfer
falls back to the shard's Ray-bytes `get`/`put` (logged once per shard; the shard is retried one-sided
after `retry_s`), a shard that cannot be reached is a miss (`[]`, `0`). A batch larger than the
staging buffer grows it (re-registering; up to `max_staging_bytes`) or goes over Ray. Without NIXL
importable, or against a shard with `transport: ray`, everything goes over Ray.

A shard handle is a Ray actor handle (methods called with `.remote`) or, for tests and single-process
use, a plain `kvstore.shard.shard.Shard`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence

import numpy as np

from kvstore.transport.base import Transport, TransportError, decode_metadata
from kvstore.transport.factory import make_transport
from kvstore.transport.leases import ReadLease, WriteLease, nothing
from kvstore.transport.memory import host_buffer

log = logging.getLogger("ponder.kvstore")

MiB = 1 << 20
_WARMUP_BYTES = 64


class NixlClient:
    def __init__(
        self,
        name: str | None = None,
        staging_bytes: int = 32 * MiB,
        max_staging_bytes: int = 1024 * MiB,
        timeout_s: float = 5.0,
        retry_s: float = 30.0,
        prefer: str = "nixl",
        pin: bool = False,
    ) -> None:
        self.name = name or f"kvclient-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.staging_bytes, self.max_staging_bytes = staging_bytes, max(staging_bytes, max_staging_bytes)
        self.timeout, self.retry_s, self.prefer, self.pin = timeout_s, retry_s, prefer, pin
        self.transport: Transport | None = None
        self.staging: np.ndarray | None = None
        self._gen = 0
        self._peers: dict[str, str | None] = {}  # shard key -> NIXL peer name; None: bytes only
        self._metadata: dict[str, bytes] = {}  # shard key -> its metadata (reconnect after a regrow)
        self._retry_at: dict[str, float] = {}  # shard key -> when to try one-sided again
        self._warned: set[str] = set()
        self._setup = threading.RLock()  # agent, peers, staging (re)creation
        self._rlock, self._wlock = threading.Lock(), threading.Lock()  # one transfer per half
        self.stats = {"nixl_gets": 0, "nixl_puts": 0, "nixl_bytes": 0, "bytes_gets": 0, "bytes_puts": 0}
        self.stats |= {"fallbacks": 0}
        self.one_sided = self._open(staging_bytes)

    # --- setup ---------------------------------------------------------------------------------

    @property
    def half(self) -> int:
        return 0 if self.staging is None else self.staging.size // 2

    def _open(self, size: int) -> bool:
        """A fresh agent with a registered staging buffer of `size` bytes; False: bytes only."""
        with self._setup:
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
                buf = host_buffer(size, self.pin)
                t.register(buf)
            except TransportError as e:
                log.warning("kv client: NIXL unavailable (%s); blocks move over Ray", e)
                return False
            self.transport, self.staging, self.staging_bytes = t, buf, size
            return True

    def _fits(self, nbytes: int) -> bool:
        """Whether a batch of `nbytes` fits half the staging, growing it (up to max_staging_bytes) if
        needed. Call with both halves' locks held (a regrow replaces the buffer)."""
        if self.staging is not None and nbytes <= self.half:
            return True
        if 2 * nbytes > self.max_staging_bytes:
            return False
        size = self.staging_bytes
        while size < 2 * nbytes:
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
        with self._setup:
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
        with self._setup:
            self._peers.pop(k, None)
            self._metadata.pop(k, None)
            self._retry_at.pop(k, None)

    def _grow(self, nbytes: int) -> bool:
        """Make a half hold `nbytes`: both halves locked around a regrow (it replaces the buffer)."""
        if self.staging is not None and nbytes <= self.half:
            return True
        with self._setup:
            return self._fits(nbytes)

    # --- data path -----------------------------------------------------------------------------

    def read(self, handle, hashes: list[str], name: str | None = None) -> ReadLease:
        """The stored prefix of `hashes` as views of encoded blocks; empty when the shard cannot be
        reached. Release the lease before the next read (it holds the read half)."""
        k = self.key(handle, name)
        if not hashes:
            return ReadLease(hashes, [], nothing)
        self._rlock.acquire()
        lease: ReadLease | None = None
        try:
            lease = self._read_one_sided(handle, hashes, k, name)
            if lease is None:  # no one-sided path for this shard (now)
                self.stats["bytes_gets"] += 1
                return self._bytes_lease(handle, hashes, list(self._call(handle, "get", hashes)))
        except Exception as e:  # the shard died or timed out: a miss, the caller recomputes
            log.warning("kv client: shard %s unreachable (%s): a miss", k, type(e).__name__)
            return ReadLease(hashes, [], nothing)
        finally:
            if lease is None:  # a one-sided lease releases the read half itself
                self._rlock.release()
        if len(lease.blobs) < len(hashes):  # the rest may be on the disk tier
            try:
                lease.blobs += self._call(handle, "get", hashes[len(lease.blobs) :])
                lease.hashes = hashes[: len(lease.blobs)]
            except Exception as e:  # what was read stays a valid prefix
                log.warning("kv client: shard %s: rest of a get failed (%s)", k, type(e).__name__)
        return lease

    def _bytes_lease(self, handle, hashes: list[str], blobs: list[bytes]) -> ReadLease:
        def release(bad: list[str]) -> None:
            if bad:
                self._tell(handle, "report_corrupt", bad)

        return ReadLease(hashes, blobs, release)

    def _read_one_sided(self, handle, hashes: list[str], k: str, name: str | None) -> ReadLease | None:
        """A lease over the read half (it owns the half's lock from here), or None: go over Ray."""
        peer = self.peer(handle, name)
        if peer is None:
            return None
        pinned: list[tuple[str, int, int]] = [tuple(p) for p in self._call(handle, "pin_for_read", hashes)]
        total = sum(n for _, _, n in pinned)
        with self._wlock:  # a regrow replaces both halves
            fits = self._grow(total)
        peer = self.peer(handle, name) if fits else None  # a regrow reconnects (from cached metadata)
        spans, local = [], 0
        for _, remote, n in pinned:
            spans.append((remote, local, n))
            local += n
        done = [h for h, _, _ in pinned]
        try:
            if peer is None:
                raise TransportError("no NIXL peer after growing the staging buffer" if fits else "too big")
            self.transport.read(peer, spans, self.timeout)
        except TransportError as e:
            self._tell(handle, "finish_read", done, True)  # our failure, not theirs
            if fits:
                self._failed(k, e)
            return None
        staging = self.staging
        views = [memoryview(staging[lo : lo + n]) for _, lo, n in spans]
        self.stats["nixl_gets"] += bool(spans)
        self.stats["nixl_bytes"] += total

        def release(bad: list[str]) -> None:
            try:
                self._tell(handle, "finish_read", [h for h in done if h not in bad], True)
                if bad:
                    self._tell(handle, "finish_read", [h for h in done if h in bad], False)
                    rest = [h for h in bad if h not in done]
                    if rest:
                        self._tell(handle, "report_corrupt", rest)
            except Exception as e:  # the shard is gone: its pins went with it
                log.debug("kv client: finish_read to %s dropped: %s", k, e)
            finally:
                self._rlock.release()

        return ReadLease(hashes, views, release, (staging, [lo for _, lo, _ in spans]))

    def open_write(self, handle, metas: Sequence, sizes: Sequence[int] | int, name: str | None = None):
        """Views (into the write half) for the caller to fill; `commit` ships them. Commit before the
        next open_write (the lease holds the write half)."""
        metas = list(metas)
        sizes = [sizes] * len(metas) if isinstance(sizes, int) else list(sizes)
        total = sum(sizes)
        self._wlock.acquire()
        try:
            if self.transport is not None and total <= self.max_staging_bytes // 2:
                with self._rlock:
                    self._grow(total)
            fits = self.staging is not None and total <= self.half
        except Exception:
            self._wlock.release()
            raise
        if not fits:  # NIXL missing or a batch too big: local buffers, put over Ray
            self._wlock.release()
            return self._bytes_write(handle, metas, sizes)
        base, views, offsets, off = self.half, [], [], 0
        for n in sizes:
            views.append(memoryview(self.staging[base + off : base + off + n]))
            offsets.append(base + off)
            off += n

        def commit(ok: list[bool]) -> int:
            try:
                return self._commit(handle, metas, views, ok, self.key(handle, name), name)
            finally:
                self._wlock.release()

        return WriteLease(metas, views, commit, (self.staging, offsets))

    def _bytes_write(self, handle, metas: list, sizes: list[int]) -> WriteLease:
        buf = np.zeros(sum(sizes), dtype=np.uint8)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        views = [memoryview(buf[o : o + n]) for o, n in zip(offsets, sizes, strict=True)]

        def commit(ok: list[bool]) -> int:
            chosen = [(m, v.tobytes()) for m, v, o in zip(metas, views, ok, strict=True) if o]
            return self._put_bytes(handle, [m for m, _ in chosen], [b for _, b in chosen])

        return WriteLease(metas, list(views), commit, (buf, offsets))

    def _put_bytes(self, handle, metas: list, blobs: list[bytes]) -> int:
        if not metas:
            return 0
        self.stats["bytes_puts"] += 1
        try:
            return int(self._call(handle, "put", metas, blobs))
        except Exception as e:
            log.warning("kv client: shard unreachable (%s): not saved", type(e).__name__)
            return 0

    def _commit(self, handle, metas: list, views: list, ok: list[bool], k: str, name: str | None) -> int:
        chosen = [i for i, o in enumerate(ok) if o]
        if not chosen:
            return 0
        try:
            done = self._write_one_sided(
                handle, [metas[i] for i in chosen], [views[i] for i in chosen], k, name
            )
        except Exception as e:
            log.warning("kv client: shard %s unreachable (%s): not saved", k, type(e).__name__)
            return 0
        if done is None:
            return self._put_bytes(handle, [metas[i] for i in chosen], [views[i].tobytes() for i in chosen])
        return done

    def _write_one_sided(self, handle, metas: list, views: list[memoryview], k: str, name: str | None):
        peer = self.peer(handle, name)
        if peer is None:
            return None
        places = self._call(handle, "reserve_for_write", metas, [len(v) for v in views])
        base = self.staging.ctypes.data
        hashes, spans = [], []
        for meta, view, place in zip(metas, views, places, strict=True):
            if place is None:
                continue
            remote = place[1] if isinstance(place, (tuple, list)) else int(place)
            local = np.frombuffer(view, dtype=np.uint8).ctypes.data - base
            hashes.append(meta.hash)
            spans.append((remote, local, len(view)))
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
        self.stats["nixl_bytes"] += sum(n for _, _, n in spans)
        return done

    def get(self, handle, hashes: list[str], name: str | None = None) -> list[bytes]:
        """The stored prefix of `hashes` as bytes; [] when the shard cannot be reached."""
        lease = self.read(handle, hashes, name)
        out = [bytes(b) for b in lease.blobs]
        lease.release()
        return out

    def put(self, handle, metas: Sequence, blobs: Sequence[bytes], name: str | None = None) -> int:
        """Save blocks on the shard; returns how many were new (0 when it cannot be reached)."""
        if not metas:
            return 0
        lease = self.open_write(handle, metas, [len(b) for b in blobs], name)
        for view, blob in zip(lease.views, blobs, strict=True):
            view[:] = memoryview(blob).cast("B")
        return lease.commit()

    def close(self) -> None:
        with self._rlock, self._wlock, self._setup:
            if self.transport is not None:
                self.transport.close()
            self.transport, self.staging = None, None
            self._peers.clear()
