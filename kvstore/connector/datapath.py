"""The worker side of Ponder's KV connector without vLLM: a step's loads and saves, moved in batches.

kvstore/connector/vllm_connector.py (the vLLM shell) forwards its worker hooks here; `ponder bench
kv-path` drives this class directly on a GPU machine that has no vLLM. Chunks are laid out layer-major
(kvstore/connector/layout.py), so every direction is one vectorised copy per layer, whatever the number of
blocks, and checksums (kvstore/digest.py) are per layer piece, hashed in parallel threads.

Loads (`start_loads` at start_load_kv, `wait_layer` from each attention layer, `finish_loads`):
  an I/O thread takes read leases on the chunks (views of the local shard's pool, of the NIXL
  staging buffer, or Ray bytes), checks every header, queues one hashing task per layer and, on CUDA,
  DMAs the payloads into one device buffer on a copy stream. `wait_layer(l)` waits for the fetch and
  for layer l's digests, then writes layer l of every good chunk with one `index_copy_` (on the
  compute stream on CUDA). A chunk that is missing or fails a check is not written from then on;
  its blocks and every later block of its request are reported as load errors, and vLLM recomputes
  from there (it discards that step's output for the request), so a bad store costs time, never a
  wrong answer.

Saves (`submit_saves` at wait_for_save): the step only enqueues. On CUDA it launches one gather per
  layer on the compute stream (stream order keeps the source blocks valid) and one D2H on a copy
  stream into page-locked memory; on CPU nothing runs in the step. A saver thread then copies (CPU:
  one gather per layer, written straight into the store's write leases), hashes, writes headers and
  commits. A request's blocks are released to vLLM only when its chunks are stored: the scheduler
  holds a request that had saves (request_finished -> True) until `finished` reports it, and
  `flush` waits for the saves of preempted requests before vLLM reuses their blocks. (Stored, not
  just copied: whoever empties vLLM's cache after a request then finds its chunks in the store.)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvstore import codec
from kvstore.connector.layout import CacheLayout
from kvstore.digest import Hasher
from kvstore.planner import LoadSpec, SaveSpec
from kvstore.shard.shard import BlockMeta
from kvstore.transport.memory import host_buffer

log = logging.getLogger("ponder.kvstore")

INF = 1 << 62


def _tensor(view: memoryview | bytes) -> torch.Tensor:
    """A flat uint8 tensor over a lease's bytes, without copying (bytes are read-only: we only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


@dataclass
class _Chunk:
    spec: int  # index of its LoadSpec in the job
    pos: int  # its index among the spec's chunks
    opened: codec.Opened
    src: int  # first block of the chunk to write
    take: int  # blocks to write
    dst: list[int]  # cache blocks they go to
    data: torch.Tensor | None = None  # [layers, *piece]: host view of the lease, or device staging
    base: torch.Tensor | None = None  # the one buffer the payload lies in (flat uint8), if known
    addr: int = 0  # the payload's byte offset in `base`


@dataclass
class _LoadJob:
    specs: list[LoadSpec]
    t0: float = field(default_factory=time.perf_counter)
    leases: list[Any] = field(default_factory=list)
    chunks: list[_Chunk] = field(default_factory=list)
    failed: dict[int, int] = field(default_factory=dict)  # spec -> first chunk not loaded
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (spec, hash, reason)
    layers: list[Future] = field(default_factory=list)  # per layer: digests of the chunks' pieces
    future: Future | None = None
    ready: bool = False
    event: Any = None  # CUDA: the DMA into `device` is done
    device: torch.Tensor | None = None
    scattered: set[int] = field(default_factory=set)
    fetch_s: float = 0.0
    blocked_s: float = 0.0  # time the step waited (fetch, digests, copies)
    index: tuple[tuple[int, ...], torch.Tensor, int | None] | None = None  # live chunks -> ids, stride

    def fail(self, spec: int, pos: int) -> None:
        self.failed[spec] = min(self.failed.get(spec, INF), pos)

    def live(self) -> list[_Chunk]:
        return [c for c in self.chunks if c.pos < self.failed.get(c.spec, INF)]


@dataclass
class _SaveJob:
    saves: list[SaveSpec]
    t0: float = field(default_factory=time.perf_counter)
    copied: bool = False
    host: np.ndarray | None = None  # CUDA: the chunks' payloads, page-locked, chunk after chunk
    event: Any = None  # CUDA: the D2H into `host` is done
    device: torch.Tensor | None = None  # CUDA: kept alive until the D2H is done
    blocked_s: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class KvDataPath:
    def __init__(
        self,
        store: Any,
        layout: CacheLayout,
        layers: list[torch.Tensor],
        model_key: str,
        hasher: Hasher | None = None,
        on_load: Any = None,
        on_save: Any = None,
        max_pending_saves: int = 8,
        threaded_saves: bool = True,
    ) -> None:
        self.store, self.layout, self.layers, self.model_key = store, layout, layers, model_key
        self.device = layers[0].device
        self.cuda = self.device.type == "cuda"
        self.hasher = hasher or Hasher()
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._rows = [layout.rows(x) for x in layers]
        self._io = ThreadPoolExecutor(1, thread_name_prefix="ponder-kv-load")
        self._scratch: torch.Tensor | None = None
        self._flat: dict[tuple, torch.Tensor] = {}
        self._load: _LoadJob | None = None
        self._on_load, self._on_save = on_load, on_save  # callbacks for stats, metrics, cost model
        self._pending: Counter[str] = Counter()  # request -> save jobs not yet copied
        self._tracked: set[str] = set()  # requests that had saves (the scheduler holds their blocks)
        self._finishing: set[str] = set()
        self._cv = threading.Condition()
        self._queue: queue.Queue[_SaveJob | None] = queue.Queue(maxsize=max_pending_saves)
        self._threaded = threaded_saves  # False: saves run inside submit_saves (tests, debugging)
        self._saver = threading.Thread(target=self._save_loop, name="ponder-kv-save", daemon=True)
        if threaded_saves:
            self._saver.start()
        self.stats = Counter()
        self.rejected: Counter[str] = Counter()
        self.copy_ops: Counter[str] = Counter()  # op -> calls touching the KV cache (structure tests)

    # --- loads ----------------------------------------------------------------------------------

    def start_loads(self, loads: Sequence[LoadSpec]) -> None:
        """Begin this step's loads; they are waited for by `wait_layer` and closed by `finish_loads`."""
        if self._load is not None:
            self.finish_loads()  # the previous step's (a hook was skipped): never leak its leases
        if not loads:
            return
        job = _LoadJob(list(loads))
        job.future = self._io.submit(self._fetch, job)
        self._load = job

    def _fetch(self, job: _LoadJob) -> None:
        t0 = time.perf_counter()
        lay, cb = self.layout, self.layout.chunk_blocks
        for si, spec in enumerate(job.specs):
            lease = self.store.read(spec.session, spec.hashes)
            job.leases.append(lease)
            base, offsets = _region(lease.region)
            for pos, h in enumerate(spec.hashes):
                first = max(0, pos * cb - spec.skip)  # the spec's block index this chunk starts at
                if first >= len(spec.block_ids):
                    break
                if pos >= len(lease.blobs):
                    job.fail(si, pos)  # not in the store (any more): recomputed
                    break
                try:
                    opened = codec.open_block(
                        lease.blobs[pos],
                        expect_model=self.model_key,
                        expect_layout=lay.name,
                        expect_dtype=lay.dtype_name,
                    )
                    if opened.header.block_hash != bytes.fromhex(h):
                        raise codec.CodecError("header", "chunk is not the one asked for")
                except codec.CodecError as e:
                    job.rejected.append((si, h, e.reason))
                    job.fail(si, pos)
                    break
                src = spec.skip if pos == 0 else 0
                take = min(cb - src, len(spec.block_ids) - first)
                chunk = _Chunk(si, pos, opened, src, take, spec.block_ids[first : first + take])
                chunk.data = lay.chunk_view(_tensor(opened.payload))
                if base is not None and pos < len(offsets):
                    chunk.base, chunk.addr = base, offsets[pos] + codec.PAYLOAD_OFFSET
                job.chunks.append(chunk)
        pieces = [c.opened.pieces() for c in job.chunks]
        if self.cuda and job.chunks:
            # The GPU copies while the CPU threads hash, layer by layer: a layer waits for its own
            # digests only.
            job.layers = [self.hasher.submit([p[i] for p in pieces]) for i in range(lay.num_layers)]
            self._dma_in(job)
        else:
            # On a CPU the copies and the hashing share the cores and the memory bus: all pieces
            # are hashed first, by every hashing thread, then copied. Interleaving them (hashing a
            # layer in other threads while one is copied, or in the copying thread just before)
            # was measured slower than this.
            flat = self.hasher.digests([p[i] for i in range(lay.num_layers) for p in pieces])
            n = len(pieces)
            job.layers = [_done(flat[i * n : (i + 1) * n]) for i in range(lay.num_layers)]
        job.fetch_s = time.perf_counter() - t0

    def _dma_in(self, job: _LoadJob) -> None:
        """All good chunks' payloads host -> one device buffer on the copy stream (one DMA each)."""
        size = self.layout.chunk_bytes
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            job.device = torch.empty(size * len(job.chunks), dtype=torch.uint8, device=self.device)
            for i, c in enumerate(job.chunks):
                region = job.device[i * size : (i + 1) * size]
                region.copy_(_tensor(c.opened.payload), non_blocking=True)
                c.data = self.layout.chunk_view(region)
                c.base, c.addr = job.device, i * size
            # The scatter index goes up with the data: built later, on the compute stream, it would be
            # a blocking copy queued behind the DMA, and the step would launch no scatter until the
            # DMA is done (measured: the 2k load took the DMA's time plus 32 serial launches).
            job.index = self._index(job.chunks)
            job.event = torch.cuda.Event()
            job.event.record(self.copy_stream)

    def wait_layer(self, index: int) -> None:
        """Layer `index` of this step's loads is in the cache when this returns (or is reported bad)."""
        job = self._load
        if job is None or index in job.scattered:
            return
        t0 = time.perf_counter()
        if not job.ready:
            job.future.result()
            job.ready = True
            if job.event is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(job.event)
                job.device.record_stream(compute)  # read there: not reusable before that stream is past
                job.index[1].record_stream(compute)
        digests = job.layers[index].result() if job.layers else []
        for chunk, d in zip(job.chunks, digests, strict=True):
            if d != chunk.opened.digests[index] and chunk.pos < job.failed.get(chunk.spec, INF):
                job.rejected.append((chunk.spec, job.specs[chunk.spec].hashes[chunk.pos], "checksum"))
                job.fail(chunk.spec, chunk.pos)
        self._scatter(job, index)
        job.scattered.add(index)
        job.blocked_s += time.perf_counter() - t0

    def _scratch_like(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        n *= self.layout.itemsize
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.uint8, device=self.device)
        return self._scratch[:n].view(self.layout.dtype).view(shape)

    def _scatter(self, job: _LoadJob, index: int) -> None:
        """Layer `index` of every live chunk into the cache: one indexed write of that layer.

        Whole chunks at one stride in one buffer (consecutive slots of the local shard, the NIXL
        staging buffer, the device buffer on CUDA) are read in place through one strided view;
        otherwise the layer's pieces are first gathered into a scratch tensor (`cat`)."""
        live = job.live()
        if not live:
            return
        lay, bd = self.layout, self.layout.block_dim
        if job.index is None or job.index[0] != tuple(id(c) for c in live):  # first layer, or a chunk failed
            job.index = self._index(live)
        _, ids, stride = job.index
        if stride is not None:
            values = self._strided(live[0].base, live[0].addr, stride, len(live), index)
            self._rows[index].index_put_(self._indices(ids, len(live)), values.movedim(0, bd))
            self.copy_ops["scatter"] += 1
            self.copy_ops["in_place"] += index == 0  # steps whose chunks were read in place
            return
        srcs = [c.data[index].narrow(bd, c.src, c.take) for c in live]
        if len(srcs) == 1:
            src = srcs[0]
        else:
            n = sum(c.take for c in live)
            src = torch.cat(srcs, dim=bd, out=self._scratch_like((*lay.pre, n, *lay.post)))
        self._rows[index].index_copy_(bd, ids, lay.rows(src))
        self.copy_ops["scatter"] += 1

    def _index(self, chunks: list[_Chunk]) -> tuple[tuple[int, ...], torch.Tensor, int | None]:
        """What a scatter of these chunks needs: their identity, the cache blocks, their stride."""
        ids = self._to_device([b for c in chunks for b in c.dst])
        return tuple(id(c) for c in chunks), ids, _stride(chunks, self.layout)

    def _to_device(self, ids: list[int]) -> torch.Tensor:
        """Block ids as an index tensor on the cache's device, without blocking the host on CUDA (from
        page-locked memory, asynchronously on the current stream; torch keeps the host copy alive)."""
        t = torch.tensor(ids, dtype=torch.long)
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _strided(self, base: torch.Tensor, addr: int, stride: int, chunks: int, layer: int) -> torch.Tensor:
        """Layer `layer` of `chunks` chunks whose payloads start at base[addr + k * stride], as one
        [chunks, *pre, chunk_blocks, row] view in the row dtype (no copy)."""
        lay = self.layout
        wide = lay.row_dtype()
        size = wide.itemsize
        row = lay.piece_bytes // size // (_prod(lay.pre) * lay.chunk_blocks)
        dims = (chunks, *lay.pre, lay.chunk_blocks, row)
        inner, acc = [], 1
        for d in reversed(dims[1:]):
            inner.append(acc)
            acc *= d
        key = (base.data_ptr(), base.numel(), wide)
        flat = self._flat.get(key)
        if flat is None:
            flat = base[: base.numel() - base.numel() % size].view(wide)
            self._flat = {key: flat}  # one buffer at a time is typical (the pool, the staging)
        offset = (addr + layer * lay.piece_bytes) // size
        return flat.as_strided(dims, (stride // size, *reversed(inner)), offset)

    def _indices(self, ids: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
        """index_put_ indices writing [*pre, chunks, chunk_blocks] rows at the blocks `ids`."""
        grid = ids.view(chunks, self.layout.chunk_blocks)
        if not self.layout.pre:
            return (grid,)
        (p,) = self.layout.pre  # FlashAttention's K/V dimension
        return (torch.arange(p, device=self.device).view(p, 1, 1), grid.unsqueeze(0))

    def finish_loads(self) -> set[int]:
        """Close this step's loads (writing any layer no hook asked for); the cache blocks that were
        not loaded, for vLLM to recompute."""
        job, self._load = self._load, None
        if job is None:
            return set()
        for i in range(self.layout.num_layers):
            if i not in job.scattered:
                self.wait_layer(i)
        if job.event is not None:
            job.event.synchronize()  # the leases' memory is read by the DMA until here
        bad_by_spec: dict[int, list[str]] = {}
        for si, h, reason in job.rejected:
            bad_by_spec.setdefault(si, []).append(h)
            self.rejected[reason] += 1
            log.warning("kv chunk %s rejected (%s): recomputing from it", h[:12], reason)
        for si, lease in enumerate(job.leases):
            lease.release(bad_by_spec.get(si, []))
        errors: set[int] = set()
        loaded = nbytes = 0
        for si, spec in enumerate(job.specs):
            stop = job.failed.get(si, INF)
            cut = max(0, stop * self.layout.chunk_blocks - spec.skip) if stop < INF else len(spec.block_ids)
            errors.update(spec.block_ids[cut:])
            loaded += min(cut, len(spec.block_ids))
        nbytes = sum(self.layout.chunk_bytes for c in job.live())
        self.stats["loaded_blocks"] += loaded
        self.stats["load_failed_blocks"] += len(errors)
        if self._on_load is not None:
            self._on_load(
                loaded, len(errors), nbytes, job.fetch_s + job.blocked_s, [r for _, _, r in job.rejected]
            )
        return errors

    def blocked_s(self) -> float:
        """Time the current step has waited for its loads so far."""
        return self._load.blocked_s if self._load is not None else 0.0

    # --- saves ----------------------------------------------------------------------------------

    def submit_saves(self, saves: Sequence[SaveSpec]) -> float:
        """Enqueue this step's saves; returns the seconds the step was blocked doing so."""
        if not saves:
            return 0.0
        t0 = time.perf_counter()
        job = _SaveJob(list(saves))
        with self._cv:
            for s in job.saves:
                self._pending[s.req_id] += 1
                self._tracked.add(s.req_id)
        if self.cuda:
            self._gather_to_host(job)
        if not self._threaded:
            self._run(job)
        else:
            self._queue.put(job)  # blocks when max_pending_saves jobs wait: backpressure, not growth
        job.blocked_s = time.perf_counter() - t0
        return job.blocked_s

    def _block_index(self, saves: Iterable[SaveSpec]) -> torch.Tensor:
        return self._to_device([b for s in saves for b in s.block_ids])

    def _gather_to_host(self, job: _SaveJob) -> None:
        """CUDA: one gather per layer on the compute stream, one D2H on the copy stream."""
        lay, bd = self.layout, self.layout.block_dim
        ids = self._block_index(job.saves)
        chunks = len(ids) // lay.chunk_blocks
        dev = torch.empty((chunks, *lay.chunk_shape), dtype=lay.dtype, device=self.device)
        for i, x in enumerate(self.layers):
            g = x.index_select(bd, ids).unflatten(bd, (chunks, lay.chunk_blocks))
            dev[:, i].copy_(g.movedim(bd, 0))
            self.copy_ops["gather"] += 1
        job.host = host_buffer(dev.numel() * lay.itemsize, pin=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            torch.from_numpy(job.host).copy_(dev.view(-1).view(torch.uint8), non_blocking=True)
            job.event = torch.cuda.Event()
            job.event.record(self.copy_stream)
        dev.record_stream(self.copy_stream)
        job.device = dev

    def _save_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.saves:  # a drain marker: every job before it is done
                job.done.set()
                continue
            self._run(job)

    def _run(self, job: _SaveJob) -> None:
        try:
            self._save(job)
        except Exception:  # a save is a cache fill: log it, never take the engine down
            log.exception("kv save of %d chunk(s) failed", sum(len(s.hashes) for s in job.saves))
        finally:
            if not job.copied:
                self._copied(job)
            job.done.set()

    def _copied(self, job: _SaveJob) -> None:
        job.copied = True
        with self._cv:
            for s in job.saves:
                self._pending[s.req_id] -= 1
                if self._pending[s.req_id] <= 0:
                    del self._pending[s.req_id]
            self._cv.notify_all()

    def _save(self, job: _SaveJob) -> None:
        lay = self.layout
        size = codec.block_bytes(lay.chunk_bytes)
        leases = []
        for s in job.saves:
            metas = [BlockMeta(h, s.tags.session, s.tags.round, s.tags.branch) for h in s.hashes]
            leases.append(self.store.open_write(s.tags.session, metas, size))
        # (save index, chunk index, payload tensor [layers, *piece]) of every chunk the store wants
        targets = [
            (si, ci, lay.chunk_view(_tensor(v)[codec.PAYLOAD_OFFSET :]))
            for si, lease in enumerate(leases)
            for ci, v in enumerate(lease.views)
            if v is not None
        ]
        if self.cuda:
            self._fill_from_host(job, targets)
            pieces = [codec.split_pieces(_payload_view(t), lay.chunk_shape) for _, _, t in targets]
            flat = self.hasher.digests([p for ps in pieces for p in ps])
            digests = [flat[k * lay.num_layers : (k + 1) * lay.num_layers] for k in range(len(targets))]
        elif targets:
            payloads = self._fill_from_cache(job, targets, self._write_region(leases))
            flat = self.hasher.digests([p for ps in payloads for p in ps])
            digests = [flat[k * lay.num_layers : (k + 1) * lay.num_layers] for k in range(len(targets))]
        for k, (si, ci, _) in enumerate(targets):
            s = job.saves[si]
            header = codec.BlockHeader(
                self.model_key,
                lay.dtype_name,
                lay.name,
                lay.chunk_shape,
                bytes.fromhex(s.hashes[ci]),
                s.tags.session,
                s.tags.round,
                s.tags.branch,
            )
            area = codec.header_area(header, lay.chunk_bytes, digests[k])
            leases[si].views[ci][: codec.PAYLOAD_OFFSET] = area
        saved = sum(lease.commit() for lease in leases)
        # Only now may vLLM reuse the source blocks (get_finished): a request whose blocks are free
        # is in the store, so whoever empties vLLM's cache next finds its chunks there.
        self._copied(job)
        self.stats["saved_blocks"] += saved * lay.chunk_blocks
        self.stats["saved_chunks"] += saved
        if self._on_save is not None:
            self._on_save(saved * lay.chunk_blocks, time.perf_counter() - job.t0)

    def _fill_from_cache(self, job: _SaveJob, targets: list, region: tuple | None) -> list[list[memoryview]]:
        """CPU: one gather per layer of the wanted chunks' blocks, written into the leases' payloads:
        straight into them when they lie at one stride in one buffer (a single-pass indexed copy), else
        through a scratch tensor. Returns each target's payload pieces, to be hashed by every hashing
        thread afterwards: hashing layers while others are copied (in other threads, or in this one
        just after each copy) was measured slower on 2 cores."""
        lay, bd, cb = self.layout, self.layout.block_dim, self.layout.chunk_blocks
        ids = torch.tensor(
            [b for si, ci, _ in targets for b in job.saves[si].block_ids[ci * cb : (ci + 1) * cb]],
            dtype=torch.long,
        )
        m = len(targets)
        grid = ids.view(m, cb)
        tmp = None if region is not None else lay.rows(self._save_scratch((*lay.pre, len(ids), *lay.post)))
        for i, rows in enumerate(self._rows):
            if region is not None:
                dst = self._strided(*region, m, i).movedim(0, bd)  # [*pre, m, cb, row]
                # rows[..., ids as [m, cb], :] written straight into the strided slots: the index
                # kernel copies at memcpy speed here, where an element-wise gather ran ~25% slower.
                torch.ops.aten.index.Tensor_out(rows, [None] * bd + [grid], out=dst)
            else:
                torch.index_select(rows, bd, ids, out=tmp)
                torch._foreach_copy_([lay.rows(t[i]) for _, _, t in targets], list(tmp.split(cb, dim=bd)))
            self.copy_ops["gather"] += 1
        return [codec.split_pieces(_payload_view(t), lay.chunk_shape) for _, _, t in targets]

    def _write_region(self, leases: list) -> tuple[torch.Tensor, int, int] | None:
        """(buffer, first payload offset, stride) when every wanted chunk of the job lies in one
        buffer at one stride, in order; else None."""
        if len(leases) != 1 or leases[0].region is None:
            return None
        buf, offsets = leases[0].region
        if not offsets:
            return None
        size = self.layout.row_dtype().itemsize
        stride = offsets[1] - offsets[0] if len(offsets) > 1 else codec.block_bytes(self.layout.chunk_bytes)
        if (
            stride % size
            or offsets[0] % size
            or any(b - a != stride for a, b in zip(offsets, offsets[1:], strict=False))
        ):
            return None
        return torch.from_numpy(buf.reshape(-1)), offsets[0] + codec.PAYLOAD_OFFSET, stride

    def _save_scratch(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = getattr(self, "_save_buf", None)
        if buf is None or buf.numel() < n:
            buf = self._save_buf = torch.empty(n, dtype=self.layout.dtype)
        return buf[:n].view(shape)

    def _fill_from_host(self, job: _SaveJob, targets: list) -> None:
        """CUDA: wait for the D2H, then copy the wanted chunks from page-locked memory into the leases."""
        job.event.synchronize()
        job.device = None
        size = self.layout.chunk_bytes
        host = torch.from_numpy(job.host)
        offsets, k = {}, 0
        for si, s in enumerate(job.saves):
            for ci in range(len(s.hashes)):
                offsets[(si, ci)] = k * size
                k += 1
        for si, ci, t in targets:
            o = offsets[(si, ci)]
            t.view(-1).view(torch.uint8).copy_(host[o : o + size])

    # --- request lifetimes ----------------------------------------------------------------------

    def finished(self, finished_req_ids: Iterable[str]) -> set[str]:
        """Of the requests vLLM finished (this step or before), those that had saves and whose copies
        are all done: their blocks may be freed now (vLLM's get_finished, sending side)."""
        with self._cv:
            self._finishing.update(r for r in finished_req_ids if r in self._tracked)
            done = {r for r in self._finishing if self._pending[r] <= 0}
            self._finishing -= done
            self._tracked -= done
            for r in done:
                self._pending.pop(r, None)
        return done

    def flush(self, req_ids: Iterable[str] = (), timeout: float | None = None) -> bool:
        """Wait until the copies of these requests (all, when none are named) are done."""
        ids = set(req_ids)
        with self._cv:
            return self._cv.wait_for(
                lambda: not any(self._pending[r] > 0 for r in (ids or list(self._pending))), timeout
            )

    def drain(self) -> None:
        """Wait until every queued save is stored (benchmarks, shutdown)."""
        if not self._threaded:
            return
        marker = _SaveJob([])
        self._queue.put(marker)
        marker.done.wait()

    def close(self) -> None:
        self.finish_loads()
        self.drain()
        if self._threaded:
            self._queue.put(None)
            self._saver.join(timeout=30)
        self._io.shutdown(wait=True)


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _prod(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _region(region: Any) -> tuple[torch.Tensor | None, list[int]]:
    """A lease's region as (flat uint8 tensor over its buffer, offsets), or (None, [])."""
    if region is None:
        return None, []
    buf, offsets = region
    return torch.from_numpy(buf.reshape(-1)), list(offsets)


def _stride(chunks: list[_Chunk], layout: CacheLayout) -> int | None:
    """The byte stride between whole chunks lying in one buffer at one stride, in order; else None."""
    first = chunks[0]
    if first.base is None:
        return None
    size = layout.row_dtype().itemsize
    ptr = (first.base.data_ptr(), first.base.numel())
    for c in chunks:
        if c.base is None or (c.base.data_ptr(), c.base.numel()) != ptr:
            return None
        if c.src or c.take != layout.chunk_blocks or c.addr % size:
            return None
    stride = chunks[1].addr - first.addr if len(chunks) > 1 else layout.chunk_bytes
    if stride < layout.chunk_bytes or stride % size:
        return None
    if any(b.addr - a.addr != stride for a, b in zip(chunks, chunks[1:], strict=False)):
        return None
    return stride


def _payload_view(t: torch.Tensor) -> memoryview:
    """A chunk payload tensor (host, contiguous) as bytes, without copying."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())
