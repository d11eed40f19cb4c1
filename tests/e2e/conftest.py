"""A local Ray cluster serving SmolLM2 over HTTP, one per test module that asks for it."""

import pytest

from cluster.local import free_port, running
from cluster.models import SMALL_MODEL, ensure_model
from services.config import DEFAULT_CONFIG, AppConfig


@pytest.fixture(scope="session")
def app_config(tmp_path_factory) -> AppConfig:
    cfg = AppConfig.load(DEFAULT_CONFIG)
    # Durable control state (reviews, feedback, budgets) in a fresh folder, never the user's.
    cfg.depth_control.state_dir = str(tmp_path_factory.mktemp("ponder-state"))
    cfg.engine.model = SMALL_MODEL
    cfg.engine.model_path = str(ensure_model(SMALL_MODEL))
    cfg.engine.max_model_len = 2048
    cfg.engine.kv_cache_memory_bytes = 128 << 20
    cfg.ray.dashboard = False
    cfg.ray.num_cpus = 4  # logical CPUs for scheduling; the replicas mostly wait on the engine
    cfg.http.port = free_port()
    cfg.ray.metrics_export_port = free_port()
    return cfg


@pytest.fixture(scope="module")  # torn down with its module: other modules start their own
def base_url(app_config):
    with running(app_config, progress=lambda m: print(m, flush=True)) as url:
        yield url
