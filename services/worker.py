"""The reasoning worker: a Ray Serve deployment holding one engine (vLLM AsyncLLM by default).

A thin shell: it turns plain-data calls into engine calls. Deltas travel back as dicts of plain
values, so nothing but ints, floats and strings crosses the process boundary.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

from ray import serve

from services.engine import Engine, GenerateDelta, GenerateResult, SamplingSpec
from services.engine_config import EngineConfig

log = logging.getLogger("ponder.worker")


def make_engine(cfg: EngineConfig) -> Engine:
    """Engine choice is config; vLLM is imported only when its engine is chosen."""
    from services.vllm_engine import VllmEngine

    if not cfg.model_path:
        raise ValueError("engine.model_path must be resolved before the worker starts")
    return VllmEngine(cfg, cfg.model_path)


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
        self.config = EngineConfig.model_validate(engine)
        self.engine = make_engine(self.config)
        self.info = await self.engine.start()
        log.info("worker ready: %s", self.info)

    async def generate_stream(
        self, request_id: str, prompt_token_ids: list[int], spec: dict
    ) -> AsyncIterator[dict]:
        async for delta in self.engine.generate_stream(request_id, prompt_token_ids, SamplingSpec(**spec)):
            yield delta_to_dict(delta)

    async def generate(self, request_id: str, prompt_token_ids: list[int], spec: dict) -> dict:
        result = await self.engine.generate(request_id, prompt_token_ids, SamplingSpec(**spec))
        return dataclasses.asdict(result)

    async def generate_n(
        self, request_id: str, prompt_token_ids: list[int], spec: dict, n: int
    ) -> list[dict]:
        results = await self.engine.generate_n(request_id, prompt_token_ids, SamplingSpec(**spec), n)
        return [dataclasses.asdict(r) for r in results]

    async def engine_info(self) -> dict:
        return dataclasses.asdict(self.info)

    async def check_health(self) -> None:
        # Serve calls this periodically; an engine whose core died fails here and is replaced.
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()

    async def __del__(self) -> None:
        engine = getattr(self, "engine", None)  # absent when __init__ failed
        if engine is not None:
            await engine.shutdown()
