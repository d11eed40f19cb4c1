"""The one place where deployments are wired into a Ray Serve application."""

from __future__ import annotations

from ray.serve import Application

from kvstore.connector.config import KvConnectorConfig
from services.config import DEFAULT_CONFIG, AppConfig, installed_model, ponder_home
from services.ingress.router import Router
from services.worker.deployment import ReasoningWorker


def connector_config(cfg: AppConfig) -> KvConnectorConfig | None:
    """The workers' KV connector (their GCS address is filled in by each worker), or None."""
    kv = cfg.kvstore
    if not kv.enabled:
        return None
    return KvConnectorConfig(
        model=cfg.engine.model,
        namespace=cfg.depth_control.namespace,  # where the shard keeper names the shards
        timeout_s=kv.timeout_s,
        transport=kv.transport,
        prefill_tokens_per_s=kv.prefill_tokens_per_s,
        load_margin=kv.load_margin,
        chunk_tokens=kv.chunk_tokens,
    )


def worker_routing(cfg: AppConfig) -> dict:
    """Session affinity (services/worker/affinity.py) when the store is on; Serve's default otherwise."""
    if not (cfg.kvstore.enabled and cfg.kvstore.affinity):
        return {}
    from ray.serve.config import RequestRouterConfig

    return {
        "request_router_config": RequestRouterConfig(
            request_router_class="services.worker.affinity:SessionAffinityRouter",
            request_router_kwargs={"max_queue": cfg.kvstore.affinity_max_queue},
        )
    }


def build_app(cfg: AppConfig) -> Application:
    """Router → reasoning workers: the deployments only. The cluster-wide actors they find by name
    (depth control, records, KV shards) are created by `services.provision.provision`."""
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


IMPORT_PATH = "services.app:app_builder"


def app_builder(args: dict) -> Application:
    """Entry point for KubeRay's serveConfigV2, whose args carry the config inline as `app`
    (deploy/helm/ponder), and for `serve deploy` of a config naming it (`config=PATH`).

    Serve builds those on the running cluster, so this is application start-up: it provisions the
    cluster-wide actors. Offline (no Ray connection: `serve build`, chart rendering) it only builds.
    `serve run services.app:app_builder` imports builders before it connects, so it cannot
    provision: use `ponder serve`, or `serve run` a Serve config file."""
    unknown = set(args) - {"config", "app"}
    if unknown or ("config" in args and "app" in args):
        raise ValueError(
            f"app_builder takes `config` (a path) or `app` (the config inline), got {sorted(args)}"
        )
    if "app" in args:
        cfg = AppConfig.from_dict(args["app"])
    else:
        cfg = AppConfig.load(args.get("config", DEFAULT_CONFIG))
    if not cfg.engine.model_path:  # pulled beforehand (`ponder models pull`, the chart's init container)
        found = installed_model(cfg.engine.model)
        if found is None:
            raise ValueError(
                f"model {cfg.engine.model!r} is not installed under {ponder_home() / 'models'} and "
                f"engine.model_path is not set: run `ponder models pull {cfg.engine.model}` first"
            )
        cfg.engine.model_path = str(found)
    import ray

    if ray.is_initialized():
        from services.provision import provision

        provision(cfg)
    return build_app(cfg)


def serve_config(cfg: AppConfig, args: dict) -> dict:
    """The Serve config (as `serve build` writes it) of the application `build_app(cfg)` makes:
    what KubeRay's serveConfigV2 must say so that the cluster runs what `ponder serve` runs.
    `args` are the builder's args as the config will carry them."""
    from ray.serve._private.build_app import build_app as build_deployments
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    # Deployment options never depend on where the weights are; the cluster resolves the path.
    placeholder = cfg.engine.model_copy(update={"model_path": cfg.engine.model_path or "unresolved"})
    built = build_deployments(build_app(cfg.model_copy(update={"engine": placeholder})), name=cfg.app_name)
    app = ServeApplicationSchema(
        name=cfg.app_name,
        route_prefix="/",
        import_path=IMPORT_PATH,
        args=args,
        deployments=[deployment_to_schema(d) for d in built.deployments],
    )
    config = {
        "http_options": {"host": "0.0.0.0", "port": cfg.http.port},
        "applications": [app.model_dump(mode="json", exclude_unset=True)],
    }
    ServeDeploySchema.model_validate(config)
    return config
