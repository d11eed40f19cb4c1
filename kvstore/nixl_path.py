"""One process's one-sided path to the store's shards over NIXL (UCX: RDMA on InfiniBand/RoCE, shared
memory or TCP between processes of one machine).

The process registers one staging buffer; each shard registered its RAM pool (kvstore/shard_actor.py).
Reads: the shard pins the blocks and says where their bytes are, one batched READ copies them into
the staging buffer, the shard unpins them. Writes: the shard places the blocks, one batched WRITE
fills the slots, the shard commits them (synchronously: the next round, anywhere, must see them).
Only offsets and lengths cross Ray; the bytes never do. Every failure returns None and the caller
uses the bytes path over Ray instead — the store is a cache, a transport problem costs time only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from kvstore.shard import BlockMeta
from kvstore.transport import TransportError, make_transport

log = logging.getLogger("ponder.kvstore")


class NixlPath:
    def __init__(self, name: str, staging_bytes: int = 64 << 20, timeout_s: float = 5.0) -> None:
        t = make_transport(name)
        if not t.one_sided:
            raise TransportError("NIXL is not available in this process")
        self.buf = np.zeros(staging_bytes, dtype=np.uint8)
        t.register(self.buf)
        self.t, self.timeout = t, timeout_s
        self.peers: dict[str, str] = {}
        self.no_nixl: set[str] = set()  # shards without NIXL: always the bytes path
        self.stats = {"nixl_reads": 0, "nixl_writes": 0, "nixl_bytes": 0, "fallbacks": 0}

    def _get(self, ref):
        import ray

        return ray.get(ref, timeout=self.timeout)

    def _peer(self, name: str, handle) -> str | None:
        if name in self.no_nixl:
            return None
        if name not in self.peers:
            md = self._get(handle.transport_metadata.remote())
            if not md:
                self.no_nixl.add(name)
                return None
            peer = self.t.connect(md)
            self.t.read(peer, [(0, 0, 1)], self.timeout)  # the first transfer sets UCX up (~50 ms)
            self.peers[name] = peer
        return self.peers[name]

    def _chunks(self, sizes: Sequence[int]) -> list[list[int]]:
        """Indices grouped so that each group fits the staging buffer."""
        groups: list[list[int]] = []
        used = self.buf.size
        for i, n in enumerate(sizes):
            if n > self.buf.size:
                raise TransportError(f"a {n}-byte block does not fit the {self.buf.size}-byte staging buffer")
            if used + n > self.buf.size:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
        return groups

    def _failed(self, name: str, exc: Exception) -> None:
        log.warning("NIXL path to %s failed (%s): using Ray for it", name, exc)
        self.peers.pop(name, None)
        self.stats["fallbacks"] += 1

    def get(self, name: str, handle, hashes: list[str]) -> list[bytes] | None:
        """The stored RAM prefix of `hashes` read one-sided; None = use the bytes path."""
        try:
            peer = self._peer(name, handle)
            if peer is None:
                return None
            spans = self._get(handle.pin_for_read.remote(hashes))
        except TransportError as exc:
            self._failed(name, exc)
            return None
        out: list[bytes] = []
        try:
            for group in self._chunks([n for _, _, n in spans]):
                local, batch = 0, []
                for i in group:
                    _, remote, n = spans[i]
                    batch.append((remote, local, n))
                    local += n
                self.t.read(peer, batch, self.timeout)
                out.extend(self.buf[lo : lo + n].tobytes() for _, lo, n in batch)
                self.stats["nixl_bytes"] += local
            self.stats["nixl_reads"] += 1
        except TransportError as exc:
            self._failed(name, exc)
            out = []
        handle.finish_read.remote([h for h, _, _ in spans], True)  # unpin (the bytes were fine)
        if not out and spans:
            return None
        return out

    def put(self, name: str, handle, metas: list[BlockMeta], blobs: list[bytes]) -> int | None:
        """Blocks written one-sided and committed; None = use the bytes path."""
        try:
            peer = self._peer(name, handle)
            if peer is None:
                return None
            offsets = self._get(handle.reserve_for_write.remote(metas, [len(b) for b in blobs]))
        except TransportError as exc:
            self._failed(name, exc)
            return None
        send = [i for i, o in enumerate(offsets) if o is not None]
        hashes = [metas[i].hash for i in send]
        try:
            for group in self._chunks([len(blobs[send[j]]) for j in range(len(send))]):
                local, batch = 0, []
                for j in group:
                    blob = blobs[send[j]]
                    self.buf[local : local + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
                    batch.append((offsets[send[j]], local, len(blob)))
                    local += len(blob)
                self.t.write(peer, batch, self.timeout)
                self.stats["nixl_bytes"] += local
            self.stats["nixl_writes"] += 1
        except TransportError as exc:
            self._failed(name, exc)
            handle.commit_write.remote(hashes, False)  # free the reserved slots
            return None
        return int(self._get(handle.commit_write.remote(hashes, True)))

    def close(self) -> None:
        self.t.close()
