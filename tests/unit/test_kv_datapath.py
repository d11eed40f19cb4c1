"""The connector's worker-side data path (kvstore/connector/datapath.py) on CPU tensors, without vLLM.

Round trips are bit-exact for the three paged-cache layouts vLLM hands a connector (emulated with
CPU tensors of random bits, NaN patterns included), over fragmented block ids, partial chunks, the
strided (in place) and the gathered path; a step moves each layer with a bounded number of copies
whatever the number of blocks (a per-block loop fails); asynchronous saves keep their source blocks
until they are copied, and a vLLM that reused them earlier would store garbage (shown); damaged or
missing chunks are reported, never written.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvstore import codec
from kvstore.connector.datapath import KvDataPath
from kvstore.connector.engine_store import LocalStore
from kvstore.connector.layout import CacheLayout
from kvstore.digest import Hasher
from kvstore.planner import KvTags, LoadSpec, SaveSpec
from kvstore.shard.pool import slot_bytes_for

L, CB, NB = 3, 4, 96  # layers, blocks per chunk, cache blocks
KEY = "m|bfloat16|bs16|c64"
TAGS = KvTags("s", 0, "")
LAYOUTS = {
    "cpu [blocks, heads, block, 2*dim]": (NB, 2, 16, 16),
    "flash-attention [2, blocks, block, heads, dim]": (2, NB, 16, 2, 8),
    "flashinfer [blocks, 2, block, heads, dim]": (NB, 2, 16, 2, 8),
}


def cache(dims: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(L):
        t = torch.empty(dims, dtype=torch.bfloat16)
        t.view(torch.int16).random_(-(2**15), 2**15, generator=gen)  # any bits, NaNs included
        out.append(t)
    return out


def bits(layers: list[torch.Tensor], lay: CacheLayout, ids: list[int]) -> list[torch.Tensor]:
    idx = torch.tensor(ids)
    return [x.view(torch.int16).index_select(lay.block_dim, idx).clone() for x in layers]


class Unplaced:
    """A store whose leases say nothing about where their bytes lie (like separate Ray bytes):
    the data path must gather the pieces itself."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner

    def read(self, session, hashes):
        lease = self.inner.read(session, hashes)
        lease.region = None
        return lease

    def open_write(self, session, metas, size):
        lease = self.inner.open_write(session, metas, size)
        lease.region = None
        return lease


def setup(dims, store_wrapper=None, threaded=True):
    layers = cache(dims)
    lay = CacheLayout.detect(layers, NB, CB)
    store = LocalStore(64, slot_bytes_for(lay.chunk_bytes))
    wrapped = store_wrapper(store) if store_wrapper else store
    path = KvDataPath(wrapped, lay, layers, KEY, hasher=Hasher(2), threaded_saves=threaded)
    return layers, lay, store, path


def hashes(n: int, tag: str = "") -> list[str]:
    return [f"{tag}{i:x}".rjust(32, "0") for i in range(n)]


def load(path: KvDataPath, spec: LoadSpec) -> set[int]:
    path.start_loads([spec])
    for i in range(L):
        path.wait_layer(i)
    return path.finish_loads()


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("placed", [True, False], ids=["in-place", "gathered"])
def test_round_trip_is_bit_exact_over_fragmented_blocks_and_partial_chunks(name, placed):
    layers, lay, store, path = setup(LAYOUTS[name], None if placed else Unplaced)
    perm = torch.randperm(NB, generator=torch.Generator().manual_seed(7)).tolist()
    src, dst = perm[: 3 * CB], perm[3 * CB : 6 * CB]  # 3 chunks, scattered blocks, in no order
    want = bits(layers, lay, src)
    path.submit_saves([SaveSpec("r", TAGS, hashes(3), src)])
    path.drain()
    assert store.shard.core.lookup_prefix(hashes(3)) == 3
    assert load(path, LoadSpec("l", "s", hashes(3), 0, dst)) == set()
    assert all(torch.equal(a, b) for a, b in zip(want, bits(layers, lay, dst), strict=True))
    # A local hit that ends mid-chunk, a load cut short: chunks 0-2 read, blocks 1..9 written.
    dst2 = perm[6 * CB : 6 * CB + 9]
    assert load(path, LoadSpec("l2", "s", hashes(3), 1, dst2)) == set()
    got = bits(layers, lay, dst2)
    assert all(torch.equal(w.narrow(lay.block_dim, 1, 9), g) for w, g in zip(want, got, strict=True))
    assert path.copy_ops["in_place"] == (1 if placed else 0)  # the partial load is always gathered
    path.close()


class CacheOps(TorchDispatchMode):
    """Counts the aten ops that read or write the KV cache tensors (by storage); views move nothing."""

    def __init__(self, layers: list[torch.Tensor]) -> None:
        super().__init__()
        self.ptrs = {x.untyped_storage().data_ptr() for x in layers}
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view:
            return func(*args, **kwargs)
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.ptrs:
                self.ops[str(func.overloadpacket)] += 1
                break
        return func(*args, **(kwargs or {}))


def cache_ops(chunks: int, placed: bool) -> tuple[int, int]:
    """Ops touching the cache to save, then load, `chunks` chunks (one step each)."""
    layers, lay, store, path = setup(
        LAYOUTS["cpu [blocks, heads, block, 2*dim]"], None if placed else Unplaced, False
    )
    ids = list(range(chunks * CB))
    with CacheOps(layers) as saving:
        path.submit_saves([SaveSpec("r", TAGS, hashes(chunks), ids)])
    back = list(range(chunks * CB, 2 * chunks * CB))
    with CacheOps(layers) as loading:
        assert load(path, LoadSpec("l", "s", hashes(chunks), 0, back)) == set()
    path.close()
    return saving.ops.total(), loading.ops.total()


@pytest.mark.parametrize("placed", [True, False], ids=["in-place", "gathered"])
def test_a_step_moves_each_layer_once_per_direction_whatever_the_number_of_blocks(placed):
    few, many = cache_ops(1, placed), cache_ops(10, placed)  # 4 blocks, then 40
    assert few == many == (L, L), (few, many)  # one gather and one scatter per layer


def test_the_count_catches_a_per_block_loop(monkeypatch):
    """The structure check above is not blind: a scatter written as a per-block loop fails it."""

    def per_block(self, job, index):
        for c in job.live():
            for k, b in enumerate(c.dst):
                self.layers[index].select(self.layout.block_dim, b).copy_(
                    c.data[index].select(self.layout.block_dim, c.src + k)
                )

    monkeypatch.setattr(KvDataPath, "_scatter", per_block)
    _, loading = cache_ops(10, True)
    assert loading == 40 * L  # the test above would have failed


class Gated:
    """A store whose writes wait for a gate: the save thread holds its copy until the test opens it."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner, self.gate = inner, threading.Event()

    def read(self, session, hashes):
        return self.inner.read(session, hashes)

    def open_write(self, session, metas, size):
        assert self.gate.wait(timeout=60)
        return self.inner.open_write(session, metas, size)


@pytest.mark.parametrize("reuse", ["when-reported", "at-once"])
def test_saved_blocks_outlive_their_request_until_the_copy_is_done(reuse):
    """vLLM frees a finished request's blocks when get_finished reports it (request_finished said
    True). A vLLM that reused them at once — as if the connector had said False — overwrites them
    before the save thread copies them, and the store ends up holding garbage: this test tells the
    two apart, so a data path that released blocks early would fail it."""
    layers, lay, store, path = setup(LAYOUTS["flash-attention [2, blocks, block, heads, dim]"], Gated)
    src = list(range(2 * CB))
    want = bits(layers, lay, src)
    path.submit_saves([SaveSpec("r", TAGS, hashes(2), src)])
    assert path.finished({"r"}) == set()  # finished, but not copied: its blocks stay vLLM's to keep
    assert not path.flush(["r"], timeout=0.05)  # a preemption would have to wait (handle_preemptions)

    def reuse_blocks() -> None:
        for x in layers:  # the next request's prefill writes into the freed blocks
            x.index_fill_(lay.block_dim, torch.tensor(src), 0.0)

    if reuse == "at-once":
        reuse_blocks()
    path.store.gate.set()
    assert path.flush(["r"], timeout=60)
    assert path.finished(set()) == {"r"}  # reported once, then forgotten
    assert path.finished({"r"}) == set()
    if reuse == "when-reported":
        reuse_blocks()
    path.drain()
    dst = list(range(4 * CB, 6 * CB))
    assert load(path, LoadSpec("l", "s", hashes(2), 0, dst)) == set()
    same = all(torch.equal(a, b) for a, b in zip(want, bits(layers, lay, dst), strict=True))
    assert same is (reuse == "when-reported")
    path.close()


def test_requests_without_saves_are_not_held_and_a_failing_store_releases_blocks():
    layers, lay, store, path = setup(LAYOUTS["cpu [blocks, heads, block, 2*dim]"])
    assert path.finished({"never-saved"}) == set()

    def broken(*args, **kwargs):
        raise OSError("the store went away")

    store.open_write = broken
    path.submit_saves([SaveSpec("r", TAGS, hashes(1), list(range(CB)))])
    assert path.flush(["r"], timeout=60)  # the job failed, but the blocks are not held forever
    assert path.finished({"r"}) == {"r"}
    path.close()


def test_damaged_and_missing_chunks_are_reported_and_never_written():
    layers, lay, store, path = setup(LAYOUTS["flashinfer [blocks, 2, block, heads, dim]"])
    src = list(range(3 * CB))
    path.submit_saves([SaveSpec("r", TAGS, hashes(3), src)])
    path.drain()
    slot = store.shard.core.blocks[hashes(3)[1]].slot
    store.shard.ram.buffer[store.shard.ram.offset(slot) + codec.PAYLOAD_OFFSET + 2 * lay.piece_bytes + 3] ^= 1
    dst = list(range(50, 50 + 3 * CB))
    before = bits(layers, lay, dst[CB:])
    errors = load(path, LoadSpec("l", "s", hashes(3), 0, dst))
    assert errors == set(dst[CB:])  # chunk 1 (its last layer) is bad: it and what follows recompute
    assert path.rejected == Counter({"checksum": 1})
    after = bits(layers, lay, dst[CB:])
    assert torch.equal(before[2], after[2])  # the bad layer of the bad chunk was never written
    assert hashes(3)[1] not in store.shard.core.blocks  # dropped from the store as corrupt
    assert load(path, LoadSpec("m", "s", hashes(3, "x"), 0, dst)) == set(dst)  # not stored at all
    path.close()
