"""Ponder's vLLM KV connector: a thin shell over kvstore/planner.py (scheduler) and
kvstore/connector/datapath.py (worker).

Load it by module path (services/worker/vllm_engine.py does):
    KVTransferConfig(kv_connector="PonderKVConnector",
                     kv_connector_module_path="kvstore.connector.vllm_connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config=KvConnectorConfig(...).to_extra_config())

Scheduler side: `get_num_new_matched_tokens` asks the store how many whole chunks of the prompt it
holds (one lookup per request, on the session's shard) and the cost model whether loading beats
recomputing; `build_connector_meta` hands the worker this step's loads, saves and preemptions;
`request_finished` holds a request's blocks while its saves are being copied.

Worker side (`KvDataPath`): `start_load_kv` starts fetching and checking the step's chunks,
`wait_for_layer_load` writes each layer just before its attention runs, and blocks that could not
be loaded are reported through `get_block_ids_with_load_errors` (vLLM recomputes from there).
`wait_for_save` only enqueues the step's saves; `get_finished` reports requests whose copies are
done, `handle_preemptions` waits for the copies of preempted requests.

One store chunk = `chunk_tokens` / block_size consecutive cache blocks of every layer, layer-major
(kvstore/connector/layout.py). Models with more than one KV cache group (hybrid attention) are refused.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvstore.chain import model_key
from kvstore.codec import block_bytes
from kvstore.connector.config import REPORT_KEY, KvConnectorConfig
from kvstore.connector.datapath import KvDataPath
from kvstore.connector.engine_store import shared_store
from kvstore.connector.layout import CacheLayout
from kvstore.connector.metrics import connector_metrics
from kvstore.cost import CostModel
from kvstore.digest import Hasher
from kvstore.planner import KvTags, Planner, StepPlan
from kvstore.shard.pool import slot_bytes_for

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
        if self.cfg.chunk_tokens % self.block_size:
            raise ValueError(
                f"kvstore chunk_tokens ({self.cfg.chunk_tokens}) must be a multiple of the engine's "
                f"block_size ({self.block_size})"
            )
        self.chunk_blocks = self.cfg.chunk_tokens // self.block_size
        dtype = vllm_config.model_config.dtype
        self.model_key = model_key(self.cfg.model, dtype, self.block_size, self.cfg.chunk_tokens)
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
        chunk_bytes = self.bytes_per_block * self.chunk_blocks
        pin = torch.cuda.is_available()  # DMAs run straight from page-locked host memory
        self.store = shared_store(self.cfg, slot_bytes_for(chunk_bytes), pin=pin)
        self.metrics = connector_metrics(self.cost)
        self.stats: dict[str, Any] = {"loaded_blocks": 0, "load_failed_blocks": 0, "saved_blocks": 0}
        self.stats["rejected"] = {}
        if role == KVConnectorRole.SCHEDULER:
            lookup = self.store.lookup if self.cfg.load else (lambda session, hashes: 0)
            self.planner = Planner(
                self.model_key,
                self.block_size,
                self.bytes_per_block,
                lookup,
                self.cost,
                chunk_blocks=self.chunk_blocks,
                save=self.cfg.save,
            )
        self.path: KvDataPath | None = None
        self._load_errors: set[int] = set()
        self._t_forward = self._loading_s = 0.0
        self._layer_index: dict[str, int] = {}
        log.info(
            "kv connector: chunks of %d tokens (%d bytes each)",
            self.cfg.chunk_tokens,
            block_bytes(chunk_bytes),
        )

    # --- scheduler side ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.sampling_params
        tags = KvTags.from_extra_args(params.extra_args if params is not None else None)
        tokens = lambda r=request: r.all_token_ids  # noqa: E731 - live: grows as the request decodes
        if tags is not None and self.planner.new_round(tags):
            # Retention: the shard keeps this round and the previous one hot, demotes older ones.
            self.store.mark_round(tags.session, tags.round)
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
        preempted = sorted(so.preempted_req_ids or ())
        return PonderConnectorMetadata(self.planner.step(new, cached, preempted))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self.planner.load_failed(set(connector_output.invalid_block_ids))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        hold, report = self.planner.finished(request.request_id)
        return hold, ({REPORT_KEY: report} if report is not None else None)

    # --- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = list(kv_caches.values())
        layout = CacheLayout.detect(layers, self.num_blocks, self.chunk_blocks)
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        self.path = KvDataPath(
            self.store,
            layout,
            layers,
            self.model_key,
            hasher=Hasher(self.cfg.hash_threads),
            on_load=self._loaded,
            on_save=self._saved,
            max_pending_saves=self.cfg.max_pending_saves,
        )

    def _loaded(self, blocks: int, failed: int, nbytes: int, seconds: float, reasons: list[str]) -> None:
        for reason in reasons:
            self.stats["rejected"][reason] = self.stats["rejected"].get(reason, 0) + 1
            self.metrics.rejected.inc(1, tags={"reason": reason})
        self.stats["loaded_blocks"] += blocks
        self.stats["load_failed_blocks"] += failed
        self.metrics.moved("loaded", blocks, seconds)
        self.metrics.moved("load_failed", failed)
        if nbytes:
            self.cost.observe_load(nbytes, seconds)

    def _saved(self, blocks: int, seconds: float) -> None:
        self.stats["saved_blocks"] += blocks
        self.metrics.moved("saved", blocks, seconds)

    def _plan(self) -> StepPlan | None:
        return self._get_connector_metadata().plan if self.has_connector_metadata() else None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        plan = getattr(kv_connector_metadata, "plan", None)
        if self.path is not None and plan is not None and plan.preempted:
            self.path.flush(plan.preempted)  # their blocks are reused from this step on

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._t_forward = time.perf_counter()  # the step starts now (prefill-rate measurement)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is not None and self.path is not None:
            self.path.start_loads(plan.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.path is not None:
            self.path.wait_layer(self._layer_index[layer_name])

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kw: Any) -> None:
        return  # saved whole, after the step (wait_for_save): one batch per step, not per layer

    def wait_for_save(self) -> None:
        plan = self._plan()
        if plan is None or self.path is None:
            return
        self._load_errors |= self._finish_loads()
        if plan.computed_tokens >= MIN_PREFILL_SAMPLE and self._t_forward:
            forward_s = time.perf_counter() - self._t_forward - self._loading_s
            self.cost.observe_prefill(plan.computed_tokens, forward_s)
        self._t_forward = 0.0
        self.path.submit_saves(plan.saves)

    def _finish_loads(self) -> set[int]:
        assert self.path is not None
        self._loading_s = self.path.blocked_s()
        return self.path.finish_loads()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.path is None:
            return None, None
        return (self.path.finished(finished_req_ids) or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.path is not None:
            self._load_errors |= self._finish_loads()  # loads the step's hooks did not close
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self.path is not None:
            self.path.close()
