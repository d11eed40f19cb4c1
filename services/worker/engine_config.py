"""Typed configuration of one inference engine (one model, one vLLM AsyncLLM).

Kept apart from `services.worker.vllm_engine` so that the app config, the CLI and the Serve builder can
validate engine settings without importing vLLM.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvstore.connector.config import KvConnectorConfig
from services.reasoning.thinking import TraceMarkers

MiB = 1 << 20


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        min_length=1,
        max_length=256,
        description='Served model name, e.g. "smollm2-135m-instruct" (what clients ask for).',
    )
    model_path: str | None = Field(
        None,
        min_length=1,
        description="Local HF model folder; None means the caller resolves it from `model`.",
    )
    dtype: Literal["bfloat16", "float32", "float16", "auto"] = Field(
        "bfloat16", description="Weight and activation dtype; bfloat16 is the fast path on CPU."
    )
    max_model_len: int = Field(
        4096, ge=256, le=131_072, description="Longest prompt + completion, in tokens."
    )
    kv_cache_memory_bytes: int = Field(
        256 * MiB,
        ge=16 * MiB,
        description="KV cache size. Always explicit: vLLM's CPU memory probe is wrong on VMs.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse KV blocks of shared prompt prefixes (later rounds re-send history).",
    )
    enforce_eager: bool = Field(
        True, description="Skip torch.compile: much faster startup, little speed lost on CPU."
    )
    max_num_seqs: int = Field(
        16, ge=1, le=1024, description="Most sequences the scheduler runs in one batch."
    )
    max_logprobs: int = Field(20, ge=1, le=20, description="Largest top-k logprobs a request may ask for.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Engine seed (requests may set their own).")
    block_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="KV cache block size in tokens; None = the platform default (128 on CPU).",
    )
    omp_threads: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=(
            "OpenMP threads of the CPU model worker. None: in-process worker -> OMP_NUM_THREADS if "
            "set (Ray sets it to the replica's num_cpus), else every CPU; worker process -> vLLM's "
            "auto binding (NUMA node 0's cores but one: 1 on a 2-core box). N: in-process -> "
            "OMP_NUM_THREADS=N, unpinned; worker process -> pinned to the first N allowed CPUs."
        ),
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template file used instead of the model's (relative to the config "
        "file), e.g. one that makes a model think (configs/local-cpu-thinking.yaml). The router "
        "renders every prompt, so only it reads this.",
    )
    reasoning: TraceMarkers | None = Field(
        None,
        description="A model that thinks natively: the strings around its thinking trace "
        "(`{start: '<think>', end: '</think>'}`), which the router turns into reasoning_content. "
        "None: read from the chat template (a template that uses <think> and </think>).",
    )
    kv_connector: KvConnectorConfig | None = Field(
        None, description="Ponder's KV store connector (set from the app's kvstore section); None = off."
    )
    ray_metrics: bool = Field(
        True, description="Inside a Ray cluster, export vLLM's engine metrics through Ray (ray_vllm_*)."
    )
    worker_process: bool = Field(
        False,
        description=(
            "Run the model worker in a process of its own (vLLM's CPU default) instead of inside "
            "the engine-core process (vLLM's default for one GPU). False starts ~10 s sooner on "
            "CPU: one process fewer importing vLLM."
        ),
    )
