"""Starts the embedded local Ray cluster and deploys the app on it; tears both down on exit."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from services.config import AppConfig

log = logging.getLogger("ponder.local")

# vLLM and Hugging Face must never reach for a hub: models are provisioned ahead of time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_ray(cfg: AppConfig) -> None:
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # address="local" always starts a private cluster; a bare init() may attach to a stale one.
    ray.init(
        address="local",
        namespace=cfg.depth_control.namespace,
        num_cpus=cfg.ray.num_cpus,
        include_dashboard=cfg.ray.dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=cfg.ray.dashboard_port,
        _metrics_export_port=cfg.ray.metrics_export_port,
        runtime_env={"env_vars": dict(OFFLINE_ENV)},
        log_to_driver=False,
    )


def deploy(cfg: AppConfig, progress: Callable[[str], None] = print) -> None:
    from ray import serve

    from services.app import build_app
    from services.provision import provision

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    progress("deploying router, reasoning worker and depth control (the engine takes ~30-60 s)...")
    t0 = time.monotonic()
    provision(cfg)  # depth control, records and the KV shards before any replica looks for them
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}\nReplica logs: /tmp/ray/session_latest/logs/serve/ (controller_*.log has the cause)"
        ) from exc
    progress(f"app ready in {time.monotonic() - t0:.0f} s")


def shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextmanager
def running(cfg: AppConfig, progress: Callable[[str], None] = print) -> Iterator[str]:
    """The app served on a fresh local cluster for the `with` block; yields the base URL."""
    start_ray(cfg)
    try:
        deploy(cfg, progress)
        yield f"http://{cfg.http.host}:{cfg.http.port}"
    finally:
        shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
