"""Application start-up: the cluster's actors that outlive any replica, created once before the
deployments start (`ponder serve`; services.app:app_builder on a running cluster).

- the depth-control and records actors (services/control/launch.py);
- when the KV store is on, the shard keeper (kvstore/shard/keeper.py): a shard on every live node,
  now and as nodes join, and their metrics re-set.

Replicas only look these up by name (`find_control`, `store_client`): a router starting, restarting
or scaling out creates nothing. All of it is idempotent: running it again finds what exists.
"""

from __future__ import annotations

import functools

from services.config import AppConfig


def shard_config(cfg: AppConfig):
    """The shards' settings from the app's `kvstore` section (one vocabulary: transport nixl | ray)."""
    from kvstore.shard.pool import slot_bytes_for
    from kvstore.shard.shard import ShardConfig
    from kvstore.shard.sizing import block_payload_bytes

    kv = cfg.kvstore
    assert cfg.engine.model_path and cfg.engine.block_size  # checked by AppConfig and build_app
    # The store's unit is a chunk of kvstore.chunk_tokens tokens (a whole number of engine blocks).
    slot = slot_bytes_for(block_payload_bytes(cfg.engine.model_path, kv.chunk_tokens, cfg.engine.dtype))
    return ShardConfig(
        ram_slots=max(1, kv.ram_bytes // slot),
        disk_slots=kv.disk_bytes // slot,
        slot_bytes=slot,
        disk_path=None if not kv.disk_bytes else f"{kv.disk_dir or '/tmp/ponder-kv'}/slots-{{node}}.bin",
        retention_window_s=kv.retention_window_s,
        transport=kv.transport,
    )


def keeper_name(cfg: AppConfig) -> str:
    from kvstore.shard.keeper import keeper_name as name

    return name(cfg.depth_control.namespace)


def provision(cfg: AppConfig) -> None:
    """Create (or find) the app's cluster-wide actors; returns once they answer."""
    from services.control.launch import HEAD_NODE_RESOURCE, start_control

    start_control(cfg.depth_control, cfg.engine.model)
    if cfg.kvstore.enabled:
        from kvstore.shard.keeper import start_keeper

        ns = cfg.depth_control.namespace
        start_keeper(shard_config(cfg), ns, keeper_name(cfg), head_resource=HEAD_NODE_RESOURCE)


def store_client(cfg: AppConfig) -> object | None:
    """A router's client of the KV shards (retention hints), or None when the store is off."""
    if not cfg.kvstore.enabled:
        return None
    from kvstore.shard.client import StoreClient, find_shards

    discover = functools.partial(find_shards, cfg.depth_control.namespace)
    return StoreClient(discover(), timeout_s=cfg.kvstore.timeout_s, discover=discover)
