"""One real vLLM engine (SmolLM2 on CPU) shared by the engine tests: startup costs ~30-50 s.

It is driven from one event loop for the whole session, because the engine's output handler is a
task of the loop that started it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.models import SMALL_MODEL, ensure_model
from services.worker.engine_config import EngineConfig, MiB
from services.worker.vllm_engine import VllmEngine


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_model(SMALL_MODEL)  # provisions it if missing (idempotent, fast when present)


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="session")
def engine(loop: asyncio.Runner, model_dir: Path) -> Iterator[VllmEngine]:
    config = EngineConfig(
        model=SMALL_MODEL, model_path=str(model_dir), kv_cache_memory_bytes=128 * MiB, max_model_len=2048
    )
    eng = VllmEngine(config, str(model_dir))
    t0 = time.perf_counter()
    loop.run(eng.start())
    print(f"\nengine startup: {time.perf_counter() - t0:.1f} s")
    try:
        yield eng
    finally:
        loop.run(eng.shutdown())
