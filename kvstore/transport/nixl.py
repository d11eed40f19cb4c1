"""`Transport` over NIXL with the UCX backend: one-sided READ/WRITE between registered host pools.

On CPU machines UCX moves DRAM to DRAM through shared memory / TCP; on GPU nodes the same calls go
over RDMA. The pool is registered once (registration pins pages and is slow), and the agent's
metadata, which carries the memory keys peers need, is taken after registration. Importing this
module imports NIXL: go through kvstore.transport.factory.make_transport to get the fallback when
it is absent.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import numpy as np

try:  # GPU images: PyPI's torch is a CUDA 13 build (requirements/gpu.txt); CPU machines: CUDA 12
    from nixl_cu13._api import nixl_agent, nixl_agent_config
except ImportError:
    from nixl_cu12._api import nixl_agent, nixl_agent_config

from kvstore.transport.base import (
    PeerInfo,
    Span,
    Transport,
    TransportError,
    as_pool,
    check_spans,
    decode_metadata,
    encode_metadata,
)

log = logging.getLogger(__name__)

_SPIN_S = 0.001  # poll without sleeping this long: small batches finish in well under a millisecond
_NAP_S = 0.0001


class NixlTransport(Transport):
    def __init__(self, name: str, progress_thread: bool = True):
        """`progress_thread`: NIXL's own thread that progresses UCX for transfers peers start on this
        pool (needed by a target: a shard). It busy-polls a core even when idle (measured 0.87
        CPU-s/s), so an initiator that only drives its own transfers (`_wait` polls them) runs
        without it."""
        super().__init__(name)
        try:
            config = nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
            self._agent = nixl_agent(name, config)
        except Exception as e:
            raise TransportError(f"NIXL agent {name!r} failed to start: {e}") from e
        if "UCX" not in self._agent.backends:  # NIXL only warns when a plugin is missing
            raise TransportError("NIXL has no UCX backend on this machine")
        self._reg = None
        self._peers: dict[str, PeerInfo] = {}

    @property
    def _addr(self) -> int:
        return self.pool.ctypes.data

    def register(self, pool: memoryview | np.ndarray) -> None:
        if self._reg is not None:
            raise TransportError("a pool is already registered")
        arr = as_pool(pool)
        try:
            self._reg = self._agent.register_memory([(arr.ctypes.data, arr.size, 0, "")], "DRAM")
        except Exception as e:
            raise TransportError(f"registering {arr.size} B failed: {e}") from e
        self._pool = arr  # keeps the memory alive as long as it is registered

    def metadata(self) -> bytes:
        return encode_metadata(self.name, self._agent.get_agent_metadata(), self._addr, self.pool.size)

    def connect(self, peer_metadata: bytes) -> str:
        info = decode_metadata(peer_metadata)
        if not info.nixl:
            raise TransportError(f"peer {info.agent!r} has no NIXL metadata (it runs BytesTransport)")
        if info.agent in self._peers:  # a restarted peer: forget its old memory keys first
            self._agent.remove_remote_agent(info.agent)
            del self._peers[info.agent]
        try:
            name = self._agent.add_remote_agent(info.nixl)
        except Exception as e:
            raise TransportError(f"NIXL rejected the metadata of peer {info.agent!r}: {e}") from e
        name = name.decode() if isinstance(name, bytes) else name
        if name != info.agent:
            raise TransportError(f"peer metadata names {info.agent!r} but its NIXL agent is {name!r}")
        self._peers[name] = info
        return name

    def read(self, peer: str, spans: Sequence[Span], timeout: float = 10.0) -> None:
        self._xfer("READ", peer, spans, timeout)

    def write(self, peer: str, spans: Sequence[Span], timeout: float = 10.0) -> None:
        self._xfer("WRITE", peer, spans, timeout)

    def _xfer(self, op: str, peer: str, spans: Sequence[Span], timeout: float) -> None:
        info = self._peers.get(peer)
        if info is None:
            raise TransportError(f"unknown peer {peer!r}: connect() it first")
        if not spans:
            return
        check_spans(spans, self.pool.size, info.size)
        s = np.asarray(spans, dtype=np.uint64).reshape(-1, 3)
        zeros = np.zeros(len(s), dtype=np.uint64)  # device id: 0 for DRAM
        local = np.stack([s[:, 1] + np.uint64(self._addr), s[:, 2], zeros], axis=1)
        remote = np.stack([s[:, 0] + np.uint64(info.addr), s[:, 2], zeros], axis=1)
        try:
            handle = self._agent.initialize_xfer(
                op,
                self._agent.get_xfer_descs(local, "DRAM"),
                self._agent.get_xfer_descs(remote, "DRAM"),
                peer,
            )
        except Exception as e:
            raise TransportError(f"NIXL {op} to {peer!r}: preparing {len(s)} spans failed: {e}") from e
        try:
            self._wait(op, peer, handle, timeout)
        except TransportError:
            raise
        except Exception as e:  # NIXL raises its own types, e.g. nixlRemoteDisconnectError for a dead peer
            raise TransportError(f"NIXL {op} to {peer!r} failed: {type(e).__name__}: {e}") from e
        finally:
            try:
                self._agent.release_xfer_handle(handle)  # cancels it if still in flight
            except Exception as e:  # NIXL keeps it on a leak list and retries it at agent teardown
                log.warning("NIXL %s to %r: releasing the transfer failed: %s", op, peer, e)

    def _wait(self, op: str, peer: str, handle, timeout: float) -> None:
        start = time.perf_counter()
        state = self._agent.transfer(handle)
        while state == "PROC":
            elapsed = time.perf_counter() - start
            if elapsed > timeout:
                raise TransportError(f"NIXL {op} to {peer!r} timed out after {timeout:.1f} s")
            if elapsed > _SPIN_S:
                time.sleep(_NAP_S)
            state = self._agent.check_xfer_state(handle)
        if state != "DONE":
            raise TransportError(f"NIXL {op} to {peer!r} failed (state {state})")

    def close(self) -> None:
        for peer in list(self._peers):
            with contextlib.suppress(Exception):  # the peer may be gone already; closing must not fail
                self._agent.remove_remote_agent(peer)
        self._peers.clear()
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None
        super().close()
