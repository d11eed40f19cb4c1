"""The one place where deployments are wired into a Ray Serve application."""

from __future__ import annotations

from ray.serve import Application

from kvstore.connector_config import KvConnectorConfig
from services.config import DEFAULT_CONFIG, AppConfig
from services.router import Router
from services.worker import ReasoningWorker


def connector_config(cfg: AppConfig) -> KvConnectorConfig | None:
    """The workers' KV connector (their GCS address is filled in by each worker), or None."""
    kv = cfg.kvstore
    if not kv.enabled:
        return None
    return KvConnectorConfig(
        model=cfg.engine.model,
        timeout_s=kv.timeout_s,
        transport=kv.transport,
        prefill_tokens_per_s=kv.prefill_tokens_per_s,
        load_margin=kv.load_margin,
    )


def worker_routing(cfg: AppConfig) -> dict:
    """Session affinity (services/affinity.py) when the store is on; Serve's default otherwise."""
    if not (cfg.kvstore.enabled and cfg.kvstore.affinity):
        return {}
    from ray.serve.config import RequestRouterConfig

    return {
        "request_router_config": RequestRouterConfig(
            request_router_class="services.affinity:SessionAffinityRouter",
            request_router_kwargs={"max_queue": cfg.kvstore.affinity_max_queue},
        )
    }


def build_app(cfg: AppConfig) -> Application:
    """Router → reasoning workers; the depth-control actor is created by the first router."""
    if not cfg.engine.model_path:
        raise ValueError("engine.model_path is not set: resolve the model first (ponder models pull)")
    engine = cfg.engine.model_copy(update={"kv_connector": connector_config(cfg)})
    worker = ReasoningWorker.options(
        num_replicas=cfg.worker.num_replicas,
        max_ongoing_requests=cfg.worker.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.worker.num_cpus, "num_gpus": cfg.worker.num_gpus},
        **worker_routing(cfg),
    ).bind(engine.model_dump())
    return Router.options(
        num_replicas=cfg.router.num_replicas,
        ray_actor_options={"num_cpus": cfg.router.num_cpus},
    ).bind(cfg.model_dump(), worker)


def app_builder(args: dict[str, str]) -> Application:
    """Entry point for `serve run services.app:app_builder config=PATH` and KubeRay serveConfigV2."""
    cfg = AppConfig.load(args.get("config", DEFAULT_CONFIG))
    if not cfg.engine.model_path:
        from cluster.models import ensure_model  # provisioning is cluster/'s job

        cfg.engine.model_path = str(ensure_model(cfg.engine.model))
    return build_app(cfg)
