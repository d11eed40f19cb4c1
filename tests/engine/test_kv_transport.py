"""KV block transport between two real processes over NIXL (UCX), plus the metadata checks and fallback.

The peer is this file run as a script in a subprocess (not multiprocessing: its spawn pickles the
target), talking length-prefixed bytes over two inherited pipes. The peer's 16 MiB pool is seeded
random data; the test reads 64 scattered 64 KiB blocks out of it, writes some back at other places,
then has the peer ship its whole pool back to compare byte for byte.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.transport.base import (
    BytesTransport,
    TransportError,
    decode_metadata,
    encode_metadata,
)
from kvstore.transport.factory import make_transport, nixl_missing

pytestmark = pytest.mark.engine

POOL = 16 * 1024 * 1024
BLOCK = 64 * 1024
PEER_SEED = 1234
_LEN = struct.Struct("<I")
ROOT = Path(__file__).resolve().parents[2]


def _nixl_missing() -> str | None:
    why = nixl_missing()  # found as the product finds it: nixl_cu13 (GPU images), then nixl_cu12
    return None if why is None else f"{why}; nixl-cu12 comes with requirements/cpu.txt"


needs_nixl = pytest.mark.skipif(_nixl_missing() is not None, reason=str(_nixl_missing()))


def _send(fd: int, data: bytes) -> None:
    os.write(fd, _LEN.pack(len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _recv_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError("peer process did not answer in time")
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer process closed its pipe")
        buf += chunk
    return bytes(buf)


def _recv(fd: int, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    (n,) = _LEN.unpack(_recv_exact(fd, _LEN.size, deadline))
    return _recv_exact(fd, n, deadline)


def _peer_pool() -> np.ndarray:
    return np.random.default_rng(PEER_SEED).integers(0, 256, POOL, dtype=np.uint8)


def _peer_main(rfd: int, wfd: int) -> None:
    """The other process: a NIXL pool of known bytes that answers b"dump" with them and b"exit"."""
    from kvstore.transport.nixl import NixlTransport

    t = NixlTransport("peer")
    t.register(_peer_pool())
    _send(wfd, t.metadata())
    t.connect(_recv(rfd))  # not needed for the test's one-sided ops; shows connect both ways works
    while (cmd := _recv(rfd, timeout=60)) != b"exit":
        assert cmd == b"dump", cmd
        _send(wfd, t.pool.tobytes())
    t.close()


@pytest.fixture
def peer() -> Iterator[tuple[int, int, subprocess.Popen]]:
    """A running peer process, the (read, write) pipe ends to talk to it, and the process."""
    to_peer_r, to_peer_w = os.pipe()
    from_peer_r, from_peer_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, __file__, str(to_peer_r), str(from_peer_w)],
        pass_fds=(to_peer_r, from_peer_w),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    os.close(to_peer_r)
    os.close(from_peer_w)
    try:
        yield from_peer_r, to_peer_w, proc
        if proc.poll() is None:  # a test may have killed it on purpose
            _send(to_peer_w, b"exit")
            assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(from_peer_r)
        os.close(to_peer_w)


@needs_nixl
def test_nixl_read_write_between_processes(peer: tuple[int, int, subprocess.Popen]) -> None:
    rfd, wfd, _ = peer
    t = make_transport("local")
    assert type(t).__name__ == "NixlTransport" and t.one_sided
    local = np.zeros(POOL, dtype=np.uint8)
    t.register(local)
    name = t.connect(_recv(rfd))
    _send(wfd, t.metadata())
    assert name == "peer"

    expected = _peer_pool()
    rng = np.random.default_rng(7)
    remote_blocks = rng.choice(POOL // BLOCK, 64, replace=False)  # scattered, out of order
    reads = [(int(b) * BLOCK, i * 2 * BLOCK, BLOCK) for i, b in enumerate(remote_blocks)]
    t.read(name, reads, timeout=10)
    for r, lo, n in reads:
        assert np.array_equal(local[lo : lo + n], expected[r : r + n]), (r, lo)

    # Write 16 of the fetched blocks (and one fresh random one) back to other remote places.
    local[BLOCK : 2 * BLOCK] = rng.integers(0, 256, BLOCK, dtype=np.uint8)
    targets = rng.choice(np.setdiff1d(np.arange(POOL // BLOCK), remote_blocks), 17, replace=False)
    writes = [(int(b) * BLOCK, i * 2 * BLOCK, BLOCK) for i, b in enumerate(targets[:16])]
    writes.append((int(targets[16]) * BLOCK, BLOCK, BLOCK))
    t.write(name, writes, timeout=10)
    for r, lo, n in writes:
        expected[r : r + n] = local[lo : lo + n]
    _send(wfd, b"dump")
    assert np.array_equal(np.frombuffer(_recv(rfd), dtype=np.uint8), expected)

    with pytest.raises(TransportError, match="outside the pools"):
        t.read(name, [(POOL - 10, 0, BLOCK)])
    with pytest.raises(TransportError, match="unknown peer"):
        t.read("nobody", reads)
    t.close()


@needs_nixl
def test_nixl_dead_peer_is_an_error(peer: tuple[int, int, subprocess.Popen]) -> None:
    rfd, wfd, proc = peer
    t = make_transport("survivor")
    t.register(np.zeros(POOL, dtype=np.uint8))
    name = t.connect(_recv(rfd))
    _send(wfd, t.metadata())
    t.read(name, [(0, 0, BLOCK)], timeout=10)
    proc.kill()
    proc.wait()
    with pytest.raises(TransportError, match=name):  # NIXL says disconnected (or we time out), never hang
        t.read(name, [(0, 0, BLOCK)], timeout=5)
    t.close()


@needs_nixl
def test_nixl_rejects_bad_metadata() -> None:
    t = make_transport("checker")
    t.register(np.zeros(BLOCK, dtype=np.uint8))
    with pytest.raises(TransportError, match="not a msgpack map"):
        t.connect(b"\xc1 definitely not metadata")
    with pytest.raises(TransportError, match="no NIXL metadata"):
        t.connect(encode_metadata("p", b"", 0, 10))
    with pytest.raises(TransportError, match="NIXL rejected"):
        t.connect(encode_metadata("p", b"garbage agent blob", 4096, 10))
    t.close()


def test_metadata_version_and_fields_checked() -> None:
    good = encode_metadata("a", b"x", 4096, 10)
    assert decode_metadata(good).agent == "a"
    import msgpack

    for blob, reason in [
        (msgpack.packb({"v": 2, "agent": "a", "nixl": b"", "addr": 0, "size": 1}), "version 2"),
        (msgpack.packb({"v": 1, "agent": "a", "nixl": "str", "addr": 0, "size": 1}), "'nixl'"),
        (msgpack.packb({"v": 1, "agent": "a", "nixl": b""}), "'addr'"),
        (msgpack.packb([1, 2]), "not a map"),
        (b"", "not a msgpack map"),
    ]:
        with pytest.raises(TransportError, match=reason):
            decode_metadata(blob)


def test_fallback_without_nixl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kvstore.transport.nixl", None)  # makes its import fail
    a, b = make_transport("a"), make_transport("b")
    assert isinstance(a, BytesTransport) and not a.one_sided
    pa, pb = np.arange(4 * BLOCK, dtype=np.uint8), np.zeros(4 * BLOCK, dtype=np.uint8)
    a.register(pa)
    b.register(memoryview(pb))
    assert b.connect(a.metadata()) == "a"
    with pytest.raises(TransportError, match="not one-sided"):
        b.read("a", [(0, 0, BLOCK)])
    ranges = [(3 * BLOCK, BLOCK), (0, 100)]
    b.scatter([(0, BLOCK), (BLOCK, 100)], a.gather(ranges))  # the bytes the caller would ship
    assert np.array_equal(pb[:BLOCK], pa[3 * BLOCK :]) and np.array_equal(pb[BLOCK : BLOCK + 100], pa[:100])


if __name__ == "__main__":
    _peer_main(int(sys.argv[1]), int(sys.argv[2]))
