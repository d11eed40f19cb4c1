"""Typed application config, loaded from `configs/*.yaml`. One model feeds every part: the local
`ponder serve`, the Serve app builder and the Helm chart's serveConfigV2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.ingress.auth import read_keys
from services.reasoning.budgets import BudgetConfig
from services.reasoning.depth_value import DepthValueConfig
from services.worker.engine_config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local-cpu.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerConfig(_Strict):
    num_replicas: int = Field(1, ge=1, le=256, description="Reasoning worker replicas (engines).")
    num_cpus: float = Field(1.0, ge=0.0, le=512, description="Ray CPUs reserved per worker replica.")
    num_gpus: float = Field(0.0, ge=0.0, le=8, description="GPUs per worker replica (0 on CPU).")
    max_ongoing_requests: int = Field(32, ge=1, le=4096, description="Concurrent rounds per replica.")


class RouterConfig(_Strict):
    num_replicas: int = Field(1, ge=1, le=256, description="Router (HTTP ingress) replicas.")
    num_cpus: float = Field(0.25, ge=0.0, le=64, description="Ray CPUs reserved per router replica.")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="Largest request body.")
    max_header_bytes: int = Field(
        32 << 10, ge=1024, le=1 << 20, description="Largest request header block (all headers together)."
    )
    max_messages: int = Field(512, ge=1, le=100_000, description="Most messages in one request.")
    default_max_tokens: int = Field(256, ge=1, le=32_768, description="Per-round completion cap.")
    max_tokens_limit: int = Field(2048, ge=1, le=131_072, description="Largest per-round cap.")
    default_temperature: float = Field(0.7, ge=0.0, le=2.0, description="When a request sets none.")
    top_logprobs: int = Field(5, ge=1, le=20, description="Top-k logprobs per token for confidence.")
    min_round_tokens: int = Field(16, ge=1, le=4096, description="Least room a round must have.")
    answer_reserve_tokens: int = Field(
        128,
        ge=1,
        le=32_768,
        description="Thinking mode with max_completion_tokens (trace plus answer): tokens the trace "
        "leaves the answer (at most half the request's max_completion_tokens).",
    )
    complexity_file: str = Field(
        "complexity.yaml", description="Complexity scorer (prompt -> tier); relative to the config file."
    )
    prompts_file: str | None = Field(
        None,
        description="Round prompts per model family; relative to the config file. None: the packaged "
        "configs/prompts.yaml.",
    )
    tot_grant_wait_s: float = Field(
        10.0, ge=0.0, le=300.0, description="How long a ToT expansion waits for the cluster's node budget."
    )
    round_retries: int = Field(
        2, ge=0, le=10, description="Times a round is resumed on another worker when its worker dies."
    )
    depth_control_timeout_s: float = Field(
        2.0, gt=0.0, le=60.0, description="Past this, a round is decided locally (hard ceilings)."
    )


class DepthControlConfig(_Strict):
    name: str = Field("ponder-depth-control", description="Name of the depth-control actor.")
    records_name: str = Field(
        "ponder-control-records", description="Name of the actor holding reviews, feedback, thresholds."
    )
    namespace: str = Field(
        "ponder", description="Ray namespace of Ponder's named actors (depth control, records, KV shards)."
    )
    tiers_file: str = Field("tiers.yaml", description="Tier table; relative to the config file.")
    domains_file: str = Field(
        "domains.yaml", description="Per-domain exit thresholds; relative to the config file."
    )
    state_dir: str | None = Field(
        None,
        description="Durable state (budgets checkpoint, reviews, feedback, thresholds): a SQLite file "
        "here. Default $PONDER_HOME/state (~/.cache/ponder/state); on Kubernetes, a volume.",
    )
    budgets: BudgetConfig = Field(default_factory=BudgetConfig, description="Cluster-wide budgets.")
    depth_value: DepthValueConfig = Field(
        default_factory=DepthValueConfig,
        description="Ceilings learned online: where later rounds stop changing answers, fewer run.",
    )
    request_retention_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="Finished requests are kept this long for feedback, then forgotten (their feedback "
        "stays): the state file stops growing with traffic.",
    )
    checkpoint_interval_s: float = Field(
        0.0, ge=0.0, le=60.0, description="Least time between budget checkpoints; 0 = after every change."
    )
    verdicts: Literal["router", "actor"] = Field(
        "router",
        description="Who decides each round: router = the router, with the same pure policy, under the "
        "plan granted at admission (two actor calls per request, whatever its rounds); actor = this "
        "actor, asked after every round the guards do not settle (a call per round, queued behind "
        "every other router's: docs/benchmarks.md, bench control).",
    )
    threshold_refresh_s: float = Field(
        1.0,
        gt=0.0,
        le=5.0,
        description="A domain threshold changed by feedback or an operator reaches new admissions "
        "(every router's) within this many seconds.",
    )
    node_lease: int = Field(
        1,
        ge=1,
        le=16,
        description="Tree-of-Thought nodes are asked of depth control this many expansions' worth at a "
        "time; a search keeps them for its later expansions and frees them when it ends.",
    )


class KvStoreConfig(_Strict):
    """The KV-state store: one shard per Ray node, a vLLM connector in every worker, session affinity."""

    enabled: bool = Field(False, description="Keep sessions' KV across rounds and workers.")
    ram_bytes: int = Field(256 << 20, ge=1 << 20, description="Host RAM per shard (one shard per node).")
    disk_bytes: int = Field(0, ge=0, description="Disk/NVMe tier per shard; 0 = none.")
    disk_dir: str | None = Field(None, description="Folder of the disk tier's slot file (per node).")
    retention_window_s: float = Field(600.0, gt=0, description="Idle sessions' blocks go first after this.")
    timeout_s: float = Field(5.0, gt=0, le=60, description="A shard slower than this is a miss.")
    transport: Literal["nixl", "ray"] = Field(
        "nixl",
        description="How block bytes move between engines and shards: nixl (one-sided READ/WRITE; each "
        "shard runs NIXL's progress thread, which keeps a core busy) or ray (bytes in Ray calls).",
    )
    affinity: bool = Field(True, description="Send a session's rounds to the worker holding its prefix.")
    affinity_max_queue: int = Field(
        4, ge=0, le=4096, description="Spill to another worker (store supplies the prefix) at this queue."
    )
    prefill_tokens_per_s: float = Field(
        2000.0, gt=0, description="Cost model's prefill rate until the engine has measured its own."
    )
    load_margin: float = Field(1.2, ge=0, description="Load only when predicted this many times faster.")
    chunk_tokens: int = Field(
        256,
        ge=1,
        le=65536,
        description="Tokens per store object (a whole number of engine blocks): loaded, saved and "
        "checksummed together. A prefix's tail shorter than a chunk is recomputed.",
    )


class RayConfig(_Strict):
    num_cpus: int | None = Field(None, ge=1, le=4096, description="CPUs of the embedded cluster.")
    dashboard: bool = Field(True, description="Start the Ray dashboard with the embedded cluster.")
    loopback_only: bool = Field(
        True,
        description="The embedded cluster is one node at 127.0.0.1: Ray's servers listen on loopback only "
        "(except Ray Serve's inter-replica gRPC, token-guarded; docs/security.md). Not used on Kubernetes.",
    )
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Ray dashboard port.")
    metrics_export_port: int = Field(
        8080, ge=1, le=65535, description="Prometheus endpoint of the embedded cluster's metrics (/metrics)."
    )


class HttpConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")


class AuthConfig(_Strict):
    """API keys (docs/security.md). Neither set: no authentication, the local default."""

    api_keys_file: str | None = Field(
        None,
        description="YAML listing the keys (`keys: [{name, sha256, requests_per_minute?, tokens_per_minute?, "
        "tiers?}]`), hashes only; relative to the config file. On Kubernetes: the mounted Secret.",
    )
    api_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding such a YAML document (a Secret as env).",
    )


class AppConfig(_Strict):
    app_name: str = Field("ponder", description="Ray Serve application name.")
    engine: EngineConfig
    worker: WorkerConfig = WorkerConfig()
    router: RouterConfig = RouterConfig()
    depth_control: DepthControlConfig = DepthControlConfig()
    kvstore: KvStoreConfig = KvStoreConfig()
    ray: RayConfig = RayConfig()
    http: HttpConfig = HttpConfig()
    auth: AuthConfig = AuthConfig()

    @model_validator(mode="after")
    def _store_needs_block_size(self) -> AppConfig:
        if self.kvstore.enabled and self.engine.block_size is None:
            raise ValueError(
                "kvstore.enabled needs engine.block_size (the store's slots are sized from it; "
                "32 is the smallest the CPU attention backend takes, 16 is common on GPUs)"
            )
        if self.kvstore.enabled and self.kvstore.chunk_tokens % self.engine.block_size:
            raise ValueError(
                f"kvstore.chunk_tokens ({self.kvstore.chunk_tokens}) must be a multiple of "
                f"engine.block_size ({self.engine.block_size})"
            )
        return self

    @classmethod
    def load(cls, path: str | Path = DEFAULT_CONFIG) -> AppConfig:
        """Load and validate; relative file paths inside resolve against the config's folder."""
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f) or {}, path)

    @classmethod
    def from_dict(cls, data: dict, config_path: str | Path = DEFAULT_CONFIG) -> AppConfig:
        """Validate a config given inline (KubeRay's serveConfigV2 args); relative file paths inside
        resolve against `config_path`'s folder (by default the packaged configs/)."""
        path = Path(config_path)
        cfg = cls.model_validate(data)
        cfg.depth_control.tiers_file = _resolve(path, cfg.depth_control.tiers_file)
        cfg.depth_control.domains_file = _resolve(path, cfg.depth_control.domains_file)
        cfg.depth_control.state_dir = _state_dir(path, cfg.depth_control.state_dir)
        cfg.router.complexity_file = _resolve(path, cfg.router.complexity_file)
        cfg.router.prompts_file = _resolve(
            path, cfg.router.prompts_file or str(DEFAULT_CONFIG.parent / "prompts.yaml")
        )
        if cfg.engine.chat_template is not None:
            cfg.engine.chat_template = _resolve(path, cfg.engine.chat_template)
        if cfg.auth.api_keys_file is not None:
            cfg.auth.api_keys_file = _resolve_keys(path, cfg.auth.api_keys_file)
        read_keys(cfg.auth.api_keys_file, cfg.auth.api_keys_env)  # bad keys fail here, not in a replica
        return cfg


def _resolve(config_path: Path, file: str) -> str:
    """Resolve against the config's folder and fail at load time, not in a remote replica."""
    resolved = Path(file) if Path(file).is_absolute() else (config_path.parent / file).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{config_path}: referenced file not found: {resolved}")
    return str(resolved)


def _resolve_keys(config_path: Path, file: str) -> str:
    resolved = Path(file) if Path(file).is_absolute() else (config_path.parent / file).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{config_path}: auth.api_keys_file not found: {resolved}")
    return str(resolved)


MODEL_MARKER = ".ponder-model.json"  # written last by a pull: a folder without it is incomplete


def ponder_home() -> Path:
    """Where Ponder keeps models and durable state: $PONDER_HOME, or ~/.cache/ponder (the one place
    this is resolved)."""
    home = os.environ.get("PONDER_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "ponder"


def installed_model(name: str) -> Path | None:
    """The folder of a model `ponder models pull` installed, or None."""
    folder = ponder_home() / "models" / name
    return folder if (folder / MODEL_MARKER).is_file() else None


def _state_dir(config_path: Path, state_dir: str | None) -> str:
    if state_dir is None:
        return str((ponder_home() / "state").resolve())
    p = Path(state_dir)
    return str(p if p.is_absolute() else (config_path.parent / p).resolve())
