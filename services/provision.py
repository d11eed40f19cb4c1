"""The router's side of the KV store: start the shards, and the client for retention hints."""

from __future__ import annotations

import threading
import time

from services.config import AppConfig


def start_publisher(client: object, every_s: float = 5.0) -> None:
    """Ask every shard to re-set its metrics periodically (Ray drops idle gauges after ~25 s)."""

    def loop() -> None:
        while True:
            client.notify_all("publish")
            time.sleep(every_s)

    threading.Thread(target=loop, name="ponder-kv-publish", daemon=True).start()


def start_store(cfg: AppConfig) -> object | None:
    """One KV shard per live Ray node (idempotent: existing shards are kept) and a client for hints."""
    kv = cfg.kvstore
    if not kv.enabled:
        return None
    from kvstore.shard.client import StoreClient, alive_nodes, start_shards
    from kvstore.shard.pool import slot_bytes_for
    from kvstore.shard.shard import ShardConfig
    from kvstore.shard.sizing import block_payload_bytes

    assert cfg.engine.model_path and cfg.engine.block_size  # checked by AppConfig and build_app
    # The store's unit is a chunk of kvstore.chunk_tokens tokens (a whole number of engine blocks).
    slot = slot_bytes_for(block_payload_bytes(cfg.engine.model_path, kv.chunk_tokens, cfg.engine.dtype))
    shard = ShardConfig(
        ram_slots=max(1, kv.ram_bytes // slot),
        disk_slots=kv.disk_bytes // slot,
        slot_bytes=slot,
        disk_path=None if not kv.disk_bytes else f"{kv.disk_dir or '/tmp/ponder-kv'}/slots-{{node}}.bin",
        retention_window_s=kv.retention_window_s,
        transport="nixl" if kv.transport == "nixl" else "bytes",
    )
    return StoreClient(start_shards(shard, alive_nodes()), timeout_s=kv.timeout_s)
