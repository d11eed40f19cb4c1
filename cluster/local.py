"""Starts the embedded local Ray cluster and deploys the app on it; tears both down on exit."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from services.config import AppConfig

log = logging.getLogger("ponder.local")

# vLLM and Hugging Face must never reach for a hub: models are provisioned ahead of time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
# Ray 2.60 binds its servers (GCS, raylet, core workers, agents, metrics export) to loopback only when
# the node IP is 127.0.0.1, and on Linux takes the machine's external address as the node IP unless
# multi-node clusters are off (`ray_constants.ENABLE_RAY_CLUSTER`, read from this variable when `ray`
# is imported; `_node_ip_address="127.0.0.1"` is rewritten to the external address). docs/security.md
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_saved_single_node: list[tuple[str | None, bool]] = []


def _single_node_on_loopback() -> None:
    """Node IP 127.0.0.1 for this process and the cluster it starts (children inherit the variable;
    this process may have imported `ray` already, so its constant is set too)."""
    from ray._private import ray_constants

    _saved_single_node.append((os.environ.get(SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER))
    os.environ[SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _restore_node_ip() -> None:
    """Undo `_single_node_on_loopback` (tests start other clusters in the same process later)."""
    if not _saved_single_node:
        return
    from ray._private import ray_constants

    env, enabled = _saved_single_node.pop()
    if env is None:
        os.environ.pop(SINGLE_NODE_ENV, None)
    else:
        os.environ[SINGLE_NODE_ENV] = env
    ray_constants.ENABLE_RAY_CLUSTER = enabled


def start_ray(cfg: AppConfig) -> None:
    import ray

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if cfg.ray.loopback_only:
        _single_node_on_loopback()
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


def connect(address: str, namespace: str, **kwargs) -> None:
    """Join a running cluster as a driver (`ponder status`, benches). A loopback-only local cluster
    (`ray.loopback_only`) is found at 127.0.0.1 only if this process is single-node too: Ray rewrites
    a loopback address to the machine's external one otherwise, where nothing listens."""
    import ray
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray._private.services import canonicalize_bootstrap_address_or_die

    # A new local cluster has Ray's token auth on; a driver joining it uses the token when there is
    # one ($RAY_AUTH_TOKEN or ~/.ray/auth_token) unless RAY_AUTH_MODE says otherwise.
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    if address in ("auto", ""):
        _single_node_on_loopback()
        try:
            address = canonicalize_bootstrap_address_or_die("auto")  # the local cluster's GCS
        except ConnectionError:
            _restore_node_ip()
            raise
        if not _is_loopback(address):
            _restore_node_ip()
    elif _is_loopback(address):
        _single_node_on_loopback()
    ray.init(address=address, namespace=namespace, **kwargs)


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


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

    try:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        _restore_node_ip()


@contextmanager
def running(cfg: AppConfig, progress: Callable[[str], None] = print) -> Iterator[str]:
    """The app served on a fresh local cluster for the `with` block; yields the base URL."""
    start_ray(cfg)
    try:
        deploy(cfg, progress)
        yield f"http://{cfg.http.host}:{cfg.http.port}"
    finally:
        shutdown()


# Between Ray's worker ports (10002-19999 by default) and the kernel's ephemeral range (32768 and up on
# Linux): a port the kernel hands out for outgoing connections can be taken by any of Ray's own
# connections between our pick and the bind, or by the time a stopped app is started again on it
# (seen once in CI: "Failed to bind to address" when `ponder serve` restarted on its port).
PORTS = (20000, 32768)
_rng = random.Random()  # its own: a test that seeds `random` must not make two picks collide
_given: set[int] = set()  # never the same port twice from one process (several picks, then binds)


def _ephemeral() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on loopback now, outside the kernel's ephemeral range where it can be."""
    lo, hi = PORTS
    eph_lo, eph_hi = _ephemeral()
    start = _rng.randrange(lo, hi)
    for i in range(hi - lo):
        port = lo + (start - lo + i) % (hi - lo)
        if eph_lo <= port <= eph_hi or port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:  # all taken: any port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
