"""Leases on a store's memory, for the engine's data path (kvstore/connector/engine_store.py, nixl_client.py).

A `ReadLease` holds views of encoded chunks that stay valid until `release`; a `WriteLease` holds
writable views that the writer fills in place, then `commit` ships and publishes them. Each is
ended exactly once: a second `release`/`commit` does nothing.

`region` says where the views live when they all lie in one buffer: (that buffer, each view's byte
offset in it). Chunks at one stride in one buffer can be moved with a single strided copy per layer
(kvstore/connector/datapath.py); without a region (e.g. separate Ray bytes objects) the mover gathers them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Region = tuple[np.ndarray, list[int]]


class ReadLease:
    def __init__(
        self,
        hashes: list[str],
        blobs: Sequence[memoryview | bytes],
        release: Callable[[list[str]], None],
        region: Region | None = None,
    ) -> None:
        self.hashes, self.blobs = list(hashes[: len(blobs)]), list(blobs)
        self.region = region
        self._release: Callable[[list[str]], None] | None = release

    def release(self, bad: Sequence[str] = ()) -> None:
        """Unpin; chunks named in `bad` failed their checks and are dropped from the store."""
        fn, self._release = self._release, None
        if fn is not None:
            fn(list(bad))


class WriteLease:
    def __init__(
        self,
        metas: list,
        views: list[memoryview | None],
        commit: Callable[[list[bool]], int],
        region: Region | None = None,
    ) -> None:
        self.metas, self.views, self.region = metas, views, region  # region: offsets of non-None views
        self._commit: Callable[[list[bool]], int] | None = commit

    def commit(self, ok: Sequence[bool] | None = None) -> int:
        """Publish the filled chunks (ok[i] False: chunk i is dropped); returns how many are new."""
        fn, self._commit = self._commit, None
        if fn is None:
            return 0
        oks = [True] * len(self.views) if ok is None else list(ok)
        return fn([o and v is not None for o, v in zip(oks, self.views, strict=True)])


def nothing(_bad: list[str]) -> None:
    return None
