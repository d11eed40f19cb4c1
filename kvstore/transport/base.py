"""Moving serialized KV blocks between host-memory pools of different processes.

A `Transport` owns one registered pool (the contiguous uint8 array of kvstore/shard/pool.py's RamPool) and
moves byte ranges between it and a peer's pool. The peer is known only by the bytes of its
`metadata()`, which the caller ships out of band (a Ray call, a pipe): nothing here is pickled.

    Metadata (msgpack map, version 1):
        {"v": 1, "agent": name, "nixl": NIXL agent metadata bytes (b"" without NIXL),
         "addr": base address of the peer's pool, "size": its length in bytes}

Transfers are batched lists of spans `(remote_offset, local_offset, length)`, checked against both
pools before anything moves: an out-of-range span from a stale or forged peer description would
otherwise be a wild one-sided read or write into another process's memory.

`BytesTransport` cannot reach a peer's memory at all (`one_sided = False`): its caller gathers the
spans into bytes, ships them itself (e.g. as Ray object refs) and scatters them on the other side.
kvstore/transport/factory.py picks NIXL when it imports, else BytesTransport.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

log = logging.getLogger(__name__)

VERSION = 1
MAX_METADATA = 16 * 1024 * 1024  # NIXL metadata is a few KiB; a bigger blob is not ours
_KEYS = {"v": int, "agent": str, "nixl": bytes, "addr": int, "size": int}

Span = tuple[int, int, int]  # (remote_offset, local_offset, length)


class TransportError(RuntimeError):
    pass


@dataclass(frozen=True)
class PeerInfo:
    agent: str
    nixl: bytes
    addr: int
    size: int


def encode_metadata(agent: str, nixl: bytes, addr: int, size: int) -> bytes:
    return msgpack.packb({"v": VERSION, "agent": agent, "nixl": nixl, "addr": addr, "size": size})


def decode_metadata(blob: bytes) -> PeerInfo:
    """Parse and check a peer's metadata; every way it can be wrong gets a TransportError saying how."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) > MAX_METADATA:
        raise TransportError("peer metadata must be bytes of at most 16 MiB")
    try:
        # No ext types and no str/bytes confusion: only plain values come out of a peer's blob.
        md = msgpack.unpackb(blob, raw=False, strict_map_key=True, max_bin_len=MAX_METADATA)
    except Exception as e:
        raise TransportError(f"peer metadata is not a msgpack map ({e})") from e
    if not isinstance(md, dict):
        raise TransportError(f"peer metadata is a {type(md).__name__}, not a map")
    if md.get("v") != VERSION:
        raise TransportError(f"peer metadata version {md.get('v')!r} is not the supported {VERSION}")
    for key, kind in _KEYS.items():
        if not isinstance(md.get(key), kind):
            raise TransportError(f"peer metadata field {key!r} missing or not {kind.__name__}")
    if md["addr"] < 0 or md["size"] < 0:
        raise TransportError("peer metadata has a negative address or size")
    return PeerInfo(md["agent"], md["nixl"], md["addr"], md["size"])


def as_pool(pool: memoryview | np.ndarray) -> np.ndarray:
    """A flat writable uint8 view of the caller's pool (no copy: it is the memory that gets registered)."""
    arr = np.frombuffer(pool, dtype=np.uint8) if isinstance(pool, memoryview) else pool
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        raise TransportError("the pool must be one C-contiguous buffer")
    if not arr.flags.writeable:
        raise TransportError("the pool must be writable (peers write into it)")
    return arr.reshape(-1).view(np.uint8)


def check_spans(spans: Sequence[Span], local_size: int, remote_size: int) -> None:
    for remote_off, local_off, length in spans:
        if length <= 0 or remote_off < 0 or local_off < 0:
            raise TransportError(f"bad span {(remote_off, local_off, length)}")
        if remote_off + length > remote_size or local_off + length > local_size:
            raise TransportError(
                f"span {(remote_off, local_off, length)} outside the pools "
                f"(local {local_size} B, remote {remote_size} B)"
            )


class Transport(ABC):
    one_sided = True  # read/write reach the peer's memory without the peer doing anything

    def __init__(self, name: str):
        self.name = name
        self._pool: np.ndarray | None = None

    @property
    def pool(self) -> np.ndarray:
        if self._pool is None:
            raise TransportError("register a pool first")
        return self._pool

    @abstractmethod
    def register(self, pool: memoryview | np.ndarray) -> None: ...

    @abstractmethod
    def metadata(self) -> bytes: ...

    @abstractmethod
    def connect(self, peer_metadata: bytes) -> str: ...

    @abstractmethod
    def read(self, peer: str, spans: Sequence[Span], timeout: float = 10.0) -> None:
        """Copy each span's bytes from the peer's pool into ours; returns when all have landed."""

    @abstractmethod
    def write(self, peer: str, spans: Sequence[Span], timeout: float = 10.0) -> None:
        """Copy each span's bytes from our pool into the peer's; returns when all have landed."""

    def close(self) -> None:
        self._pool = None

    # Local helpers for callers that ship the bytes themselves (always available).
    def gather(self, ranges: Sequence[tuple[int, int]]) -> bytes:
        """The bytes of (offset, length) ranges of our pool, concatenated."""
        check_spans([(0, off, n) for off, n in ranges], self.pool.size, 1 << 62)
        return b"".join(self.pool[off : off + n].tobytes() for off, n in ranges)

    def scatter(self, ranges: Sequence[tuple[int, int]], data: bytes | memoryview) -> None:
        """Place `data` (as made by gather) into the (offset, length) ranges of our pool."""
        check_spans([(0, off, n) for off, n in ranges], self.pool.size, 1 << 62)
        if sum(n for _, n in ranges) != len(data):
            raise TransportError("scatter: data length does not match the ranges")
        src = np.frombuffer(data, dtype=np.uint8)
        pos = 0
        for off, n in ranges:
            self.pool[off : off + n] = src[pos : pos + n]
            pos += n


class BytesTransport(Transport):
    """The fallback without NIXL: metadata and connect work, moving bytes is the caller's job.

    read/write raise, so code that forgot to check `one_sided` fails loudly instead of hanging.
    """

    one_sided = False

    def __init__(self, name: str):
        super().__init__(name)
        self._peers: dict[str, PeerInfo] = {}

    def register(self, pool: memoryview | np.ndarray) -> None:
        self._pool = as_pool(pool)

    def metadata(self) -> bytes:
        return encode_metadata(self.name, b"", 0, self.pool.size)

    def connect(self, peer_metadata: bytes) -> str:
        info = decode_metadata(peer_metadata)
        self._peers[info.agent] = info
        return info.agent

    def read(self, peer: str, spans: Sequence[Span], timeout: float = 10.0) -> None:
        raise TransportError("BytesTransport is not one-sided: gather on the peer, ship, scatter here")

    def write(self, peer: str, spans: Sequence[Span], timeout: float = 10.0) -> None:
        raise TransportError("BytesTransport is not one-sided: gather here, ship, scatter on the peer")
