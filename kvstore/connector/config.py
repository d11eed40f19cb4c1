"""Typed settings of Ponder's vLLM KV connector (kvstore/connector/vllm_connector.py), importable
without vLLM.

They travel to vLLM's engine-core process inside `KVTransferConfig.kv_connector_extra_config`
(`to_extra_config`) and are validated again there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CONNECTOR_CLASS = "PonderKVConnector"
CONNECTOR_MODULE = "kvstore.connector.vllm_connector"
REPORT_KEY = "ponder_kv"  # in vLLM's RequestOutput.kv_transfer_params of a finished request


class KvConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, description="Model id written into every block and checked on load.")
    store: Literal["ray", "local"] = Field(
        "ray",
        description="ray: the cluster's shard actors (found by name); local: a shard inside the engine "
        "process (one engine, tests and benchmarks).",
    )
    ray_address: str | None = Field(None, description="GCS address of the cluster (set by the worker).")
    namespace: str = Field("ponder", description="Ray namespace of the shard actors.")
    timeout_s: float = Field(5.0, gt=0, description="A shard slower than this is a miss.")
    transport: Literal["nixl", "ray"] = Field(
        "nixl",
        description="How block bytes move between engines and shards: nixl = one-sided NIXL READ/WRITE "
        "(falls back to ray per shard when NIXL or the shard cannot), ray = bytes in Ray calls.",
    )
    staging_bytes: int = Field(
        64 << 20, ge=1 << 20, description="The engine's NIXL staging buffer (grows to fit a step's chunks)."
    )
    chunk_tokens: int = Field(
        256,
        ge=1,
        le=65536,
        description="Tokens per store object: a whole number of vLLM blocks, loaded and saved together "
        "(per-object costs are paid per chunk; LMCache also uses 256). A prefix's tail shorter than a "
        "chunk is recomputed, not stored.",
    )
    hash_threads: int | None = Field(
        None, ge=1, le=64, description="Threads that checksum chunks; default min(8, CPUs)."
    )
    max_pending_saves: int = Field(
        8, ge=1, le=1024, description="Steps' saves queued behind the save thread before a step waits."
    )
    local_ram_slots: int = Field(512, ge=1, description="Blocks held by the local store.")
    prefill_tokens_per_s: float = Field(
        2000.0, gt=0, description="Cost model's prefill rate until measured (tokens/s)."
    )
    load_bytes_per_s: float = Field(1.0e9, gt=0, description="Cost model's load bandwidth until measured.")
    load_margin: float = Field(1.2, ge=0, description="A load must be predicted this many times faster.")
    save: bool = Field(True, description="Save completed blocks (False: load only).")
    load: bool = Field(True, description="Load from the store (False: save only, e.g. to measure).")

    def to_extra_config(self) -> dict:
        return self.model_dump()
