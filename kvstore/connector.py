"""Ponder's vLLM KV connector: a thin shell over kvstore/planner.py (scheduler) and the store.

Load it by module path (services/vllm_engine.py does):
    KVTransferConfig(kv_connector="PonderKVConnector", kv_connector_module_path="kvstore.connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config=KvConnectorConfig(...).to_extra_config())

Scheduler side: `get_num_new_matched_tokens` asks the store how much of the prompt it holds (one
lookup per request, on the session's shard) and the cost model whether loading beats recomputing;
`build_connector_meta` hands the worker this step's loads and saves.

Worker side: `start_load_kv` fetches the blocks, checks each with the codec (model, layout, dtype,
checksums, and that the block is the one asked for) and copies it into vLLM's paged cache before the
forward pass. A block that is missing or rejected is reported through
`get_block_ids_with_load_errors`; vLLM then recomputes from that block on ("recompute" policy), so a
bad store costs time, never a wrong answer. `wait_for_save` (after the forward pass, once per step)
gathers the blocks completed in the step, encodes them and puts them synchronously, so a session's
next round, wherever it runs, finds them.

One store block = one vLLM cache block of every layer, stacked: [layers, *per-layer block shape]
(on CPU [layers, kv_heads, block_size, 2*head_dim]). Models with more than one KV cache group
(hybrid attention) are refused at start.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvstore.chain import model_key
from kvstore.codec import BlockHeader, CodecError, decode, encode
from kvstore.connector_config import REPORT_KEY, KvConnectorConfig
from kvstore.connector_metrics import connector_metrics
from kvstore.cost import CostModel
from kvstore.engine_store import shared_store
from kvstore.planner import KvTags, Planner, StepPlan
from kvstore.pool import slot_bytes_for
from kvstore.shard import BlockMeta

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("ponder.kvstore")

MIN_PREFILL_SAMPLE = 64  # steps computing fewer tokens are decode-bound: not a prefill-rate sample
_COSTS: dict[str, CostModel] = {}  # per model key; shared by both roles when they share a process


class PonderConnectorMetadata(KVConnectorMetadata):
    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class PonderKVConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = KvConnectorConfig.model_validate(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.model_key = model_key(self.cfg.model, vllm_config.model_config.dtype, self.block_size)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) != 1:
            raise ValueError(f"PonderKVConnector needs one KV cache group, this model has {len(groups)}")
        self.num_blocks = kv_cache_config.num_blocks
        self.bytes_per_block = groups[0].kv_cache_spec.page_size_bytes * len(groups[0].layer_names)
        self.cost = _COSTS.setdefault(
            self.model_key,
            CostModel(
                prefill_tokens_per_s=self.cfg.prefill_tokens_per_s,
                load_bytes_per_s=self.cfg.load_bytes_per_s,
                margin=self.cfg.load_margin,
            ),
        )
        self.store = shared_store(self.cfg, slot_bytes_for(self.bytes_per_block))
        self.metrics = connector_metrics(self.cost)
        self.stats = {"loaded_blocks": 0, "load_failed_blocks": 0, "saved_blocks": 0, "rejected": {}}
        if role == KVConnectorRole.SCHEDULER:
            lookup = self.store.lookup if self.cfg.load else (lambda session, hashes: 0)
            self.planner = Planner(self.model_key, self.block_size, self.bytes_per_block, lookup, self.cost)
        self.layers: list[torch.Tensor] = []
        self._load_errors: set[int] = set()
        self._t_forward = self._t_loading = 0.0

    # --- scheduler side ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.sampling_params
        tags = KvTags.from_extra_args(params.extra_args if params is not None else None)
        tokens = lambda r=request: r.all_token_ids  # noqa: E731 - live: grows as the request decodes
        if tags is not None and self.planner.new_round(tags):
            # Retention: the shard keeps this round and the previous one hot, demotes older ones.
            self.store.notify(tags.session, "mark_round", tags.session, tags.round)
        n = self.planner.match(request.request_id, tags, tokens, num_computed_tokens)
        if tags is not None:
            result = "hit" if n else self.planner.decision(request.request_id)
            self.metrics.lookups.inc(1, tags={"result": result})
        return n, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        self.planner.allocated(request.request_id, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        so = scheduler_output
        new = [
            (r.req_id, r.block_ids[0], r.num_computed_tokens, so.num_scheduled_tokens.get(r.req_id, 0))
            for r in so.scheduled_new_reqs
        ]
        c = so.scheduled_cached_reqs
        cached = [
            (
                rid,
                c.new_block_ids[i][0] if c.new_block_ids[i] is not None else None,
                rid in c.resumed_req_ids,
                c.num_computed_tokens[i],
                so.num_scheduled_tokens.get(rid, 0),
            )
            for i, rid in enumerate(c.req_ids)
        ]
        plan = self.planner.step(new, cached)
        if not self.cfg.save:
            plan.saves = []
        return PonderConnectorMetadata(plan)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self.planner.load_failed(set(connector_output.invalid_block_ids))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        report = self.planner.finished(request.request_id)
        return False, ({REPORT_KEY: report} if report is not None else None)

    # --- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layers = list(kv_caches.values())
        first = self.layers[0]
        # CPU and most GPU backends put the block index first; FlashAttention's [2, blocks, ...] second.
        self.block_dim = 0 if first.shape[0] == self.num_blocks else 1
        block_shape = first.select(self.block_dim, 0).shape
        self.shape = (len(self.layers), *block_shape)
        self.dtype = str(first.dtype).removeprefix("torch.")
        self.layout = f"stack{self.block_dim}:{list(self.shape)}"
        if any(t.shape != first.shape or t.dtype != first.dtype for t in self.layers):
            raise ValueError("PonderKVConnector needs every layer's KV cache to have one shape and dtype")

    def _gather(self, block_id: int) -> memoryview:
        t = torch.stack([x.select(self.block_dim, block_id) for x in self.layers]).cpu()
        return memoryview(t.view(torch.uint8).numpy()).cast("B")

    def _scatter(self, block_id: int, payload: memoryview) -> None:
        with warnings.catch_warnings():  # read-only source buffer: we only read it
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(np.frombuffer(payload, dtype=np.uint8))
        src = src.view(self.layers[0].dtype).reshape(self.shape)
        for i, x in enumerate(self.layers):
            x.select(self.block_dim, block_id).copy_(src[i], non_blocking=False)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # The step starts now; loads run before the forward pass (sync) and are subtracted.
        self._t_forward, self._t_loading = time.perf_counter(), 0.0

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        t0 = time.perf_counter()
        for load in self._get_connector_metadata().plan.loads:
            self._load_one(load.session, load.hashes, load.block_ids)
        self._t_loading += time.perf_counter() - t0

    def _load_one(self, session: str, hashes: list[str], block_ids: list[int]) -> None:
        t0 = time.perf_counter()
        blobs = self.store.get(session, hashes)
        nbytes, good = 0, 0
        for h, bid, blob in zip(hashes, block_ids, blobs, strict=False):
            try:
                header, payload = decode(
                    blob, expect_model=self.model_key, expect_layout=self.layout, expect_dtype=self.dtype
                )
                if header.block_hash != bytes.fromhex(h):
                    raise CodecError("header", "block is not the one asked for")
            except CodecError as e:
                self.stats["rejected"][e.reason] = self.stats["rejected"].get(e.reason, 0) + 1
                self.metrics.rejected.inc(1, tags={"reason": e.reason})
                log.warning("kv block %s rejected (%s): recomputing from it", h[:12], e)
                self.store.report_corrupt(session, [h])
                break
            self._scatter(bid, payload)
            nbytes += len(blob)
            good += 1
        if good < len(hashes):
            self._load_errors.update(block_ids[good:])
            self.stats["load_failed_blocks"] += len(hashes) - good
        self.stats["loaded_blocks"] += good
        elapsed = time.perf_counter() - t0
        self.metrics.moved("loaded", good, elapsed)
        self.metrics.moved("load_failed", len(hashes) - good)
        if good:
            self.cost.observe_load(nbytes, elapsed)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: done before the forward pass starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kw: Any) -> None:
        return  # saved whole, after the step (wait_for_save): one store call per step, not per layer

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        plan = self._get_connector_metadata().plan
        if plan.computed_tokens >= MIN_PREFILL_SAMPLE and self._t_forward:
            forward_s = time.perf_counter() - self._t_forward - self._t_loading
            self.cost.observe_prefill(plan.computed_tokens, forward_s)
        self._t_forward = 0.0
        t0 = time.perf_counter()
        saved = 0
        for save in plan.saves:
            metas, blobs = [], []
            for h, bid in zip(save.hashes, save.block_ids, strict=True):
                header = BlockHeader(
                    self.model_key,
                    self.dtype,
                    self.layout,
                    self.shape,
                    bytes.fromhex(h),
                    save.tags.session,
                    save.tags.round,
                    save.tags.branch,
                )
                blobs.append(encode(header, self._gather(bid)))
                metas.append(BlockMeta(h, save.tags.session, save.tags.round, save.tags.branch))
            saved += self.store.put(save.tags.session, metas, blobs)
        if plan.saves:
            self.stats["saved_blocks"] += saved
            self.metrics.moved("saved", saved, time.perf_counter() - t0)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
