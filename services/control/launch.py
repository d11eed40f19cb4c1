"""The control plane's two actors: created once at application start-up (services/provision.py),
found by name by every router replica afterwards.

Both are detached (they outlive any router), restart forever, take one call at a time and live on
the head node: its `state_dir` is the volume there (deploy/helm: the head pod's state PVC), and a
restart must find the same SQLite file, which a worker node's disk would not have.
"""

from __future__ import annotations

from services.config import DepthControlConfig
from services.control.depth_control import DepthControl
from services.control.records import ControlRecords

HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource


class ControlMissingError(RuntimeError):
    """A router started on a cluster where the app's actors were never created."""


def _options(name: str, namespace: str) -> dict:
    return {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": -1,
        "max_concurrency": 1,  # one call at a time: the budgets and the SQLite file need no locks
        "num_cpus": 0,
        "resources": {HEAD_NODE_RESOURCE: 0.001},
    }


def start_control(cfg: DepthControlConfig, served_model: str | None = None) -> tuple[object, object]:
    """(depth control, records), created if absent; both answer before this returns. `served_model`:
    calibrations taken with another model are not applied."""
    import ray

    # Only the creating call's arguments count, and Ray reuses them on every restart; node ids are
    # random per node start, so this names the cluster's lifetime.
    incarnation = ray.get_runtime_context().get_node_id()[:16]
    depth = ray.remote(DepthControl).options(**_options(cfg.name, cfg.namespace))
    records = ray.remote(ControlRecords).options(**_options(cfg.records_name, cfg.namespace))
    handles = (
        depth.remote(cfg.model_dump(), incarnation, served_model=served_model),
        records.remote(cfg.model_dump(), served_model=served_model),
    )
    ray.get([h.ping.remote() for h in handles])  # a bad state file fails start-up, not a request
    return handles


def find_control(cfg: DepthControlConfig) -> tuple[object, object]:
    """(depth control, records) by name; a clear error when the app was started without them."""
    import ray

    try:
        return tuple(ray.get_actor(n, namespace=cfg.namespace) for n in (cfg.name, cfg.records_name))
    except ValueError as exc:
        raise ControlMissingError(
            f"no {cfg.name!r}/{cfg.records_name!r} actors in Ray namespace {cfg.namespace!r}: the app's "
            "actors are created at start-up by `ponder serve` or by services.app:app_builder on a "
            f"running cluster (serveConfigV2, `serve deploy`) ({exc})"
        ) from exc
