"""The reasoning worker: a Ray Serve deployment holding one engine (vLLM AsyncLLM by default).

A thin shell: it turns plain-data calls into engine calls. Deltas travel back as dicts of plain
values, so nothing but ints, floats and strings crosses the process boundary.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

from ray import serve

from services.worker.engine import Engine, GenerateDelta, GenerateResult, SamplingSpec
from services.worker.engine_config import EngineConfig

log = logging.getLogger("ponder.worker")


def make_engine(cfg: EngineConfig) -> Engine:
    """Engine choice is config; vLLM is imported only when its engine is chosen."""
    from services.worker.vllm_engine import VllmEngine

    if not cfg.model_path:
        raise ValueError("engine.model_path must be resolved before the worker starts")
    return VllmEngine(cfg, cfg.model_path)


def with_cluster_address(cfg: EngineConfig) -> EngineConfig:
    """The KV connector runs in vLLM's own process, which joins this Ray cluster by its GCS address."""
    if cfg.kv_connector is None or cfg.kv_connector.ray_address:
        return cfg
    import ray

    address = ray.get_runtime_context().gcs_address
    connector = cfg.kv_connector.model_copy(update={"ray_address": address})
    return cfg.model_copy(update={"kv_connector": connector})


def replica_name() -> str:
    """This replica's id (reported per round as `worker`); "" outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a replica (unit tests): no name to report
        return ""


def spec_from_dict(spec: dict) -> SamplingSpec:
    spec = dict(spec)
    for key in ("stop", "kv_tags"):  # tuples arrive as lists
        if spec.get(key) is not None:
            spec[key] = tuple(spec[key])
    return SamplingSpec(**spec)


def delta_to_dict(d: GenerateDelta) -> dict:
    return dataclasses.asdict(d)


def delta_from_dict(d: dict) -> GenerateDelta:
    d = dict(d)
    d["logprobs"] = [tuple(tuple(p) for p in t) for t in d["logprobs"]]
    return GenerateDelta(**d)


def result_from_dict(d: dict) -> GenerateResult:
    d = dict(d)
    d["logprobs"] = [tuple(tuple(p) for p in t) for t in d["logprobs"]]
    return GenerateResult(**d)


@serve.deployment(name="ReasoningWorker")
class ReasoningWorker:
    async def __init__(self, engine: dict) -> None:
        self.config = with_cluster_address(EngineConfig.model_validate(engine))
        self.replica = replica_name()
        self.engine = make_engine(self.config)
        self.info = await self.engine.start()
        log.info("worker ready: %s", self.info)

    # `session` (and a streamed call's `follow`) are for the affinity router (services/worker/affinity.py),
    # which routes by them.
    async def generate_stream(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: dict,
        session: str | None = None,
        follow: bool = False,
    ) -> AsyncIterator[dict]:
        async for delta in self.engine.generate_stream(request_id, prompt_token_ids, spec_from_dict(spec)):
            if delta.finished:
                delta.worker = self.replica
            yield delta_to_dict(delta)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], spec: dict, session: str | None = None
    ) -> dict:
        result = await self.engine.generate(request_id, prompt_token_ids, spec_from_dict(spec))
        result.worker = self.replica
        return dataclasses.asdict(result)

    async def generate_n(
        self, request_id: str, prompt_token_ids: list[int], spec: dict, n: int, session: str | None = None
    ) -> list[dict]:
        results = await self.engine.generate_n(request_id, prompt_token_ids, spec_from_dict(spec), n)
        for r in results:
            r.worker = self.replica
        return [dataclasses.asdict(r) for r in results]

    async def engine_info(self) -> dict:
        return dataclasses.asdict(self.info)

    async def engine_stats(self) -> dict:
        """Read-only: requests the engine still tracks (0 when idle, else some leaked); bench soak."""
        count = getattr(self.engine, "num_unfinished_requests", None)
        return {"replica": self.replica, "unfinished_requests": None if count is None else count()}

    async def check_health(self) -> None:
        # Serve calls this periodically; an engine whose core died fails here and is replaced.
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()

    async def __del__(self) -> None:
        engine = getattr(self, "engine", None)  # absent when __init__ failed
        if engine is not None:
            await engine.shutdown()
