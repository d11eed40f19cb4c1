"""The inference engine seen by Ponder: a small ABC so the worker holds *an* engine, not vLLM.

The real implementation is `services.worker.vllm_engine.VllmEngine`; tests of pure logic may use a fake.
Everything crossing the engine boundary is plain data (token ids, floats, strings), so results can
travel between Ray processes without custom serialization.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# One generated token's alternatives: (token_id, logprob) pairs, best first. Holds the top-k
# alternatives plus the sampled token when it is outside the top-k.
TopLogprobs = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SamplingSpec:
    """What one round asks of the engine. Mirrors the subset of vLLM's SamplingParams we use."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 5
    ignore_eos: bool = False
    # (session, round, branch): lets the KV store keep and reuse this round's KV (None: not stored)
    kv_tags: tuple[str, int, str] | None = None
    # Not sent to the engine. The session a call without KV tags is routed by (a probe goes where the
    # session's prefix is cached, without being stored).
    affinity: str | None = None
    # Not sent to the engine. Thinking mode: the request's max_completion_tokens (trace, probes and
    # answer together; OpenAI's meaning). None: max_tokens caps each round and the answer alone.
    completion_budget: int | None = None

    @property
    def session(self) -> str | None:
        """The session this call belongs to, for affinity: its KV tags' session, else `affinity`."""
        return self.kv_tags[0] if self.kv_tags else self.affinity

    @property
    def follows(self) -> bool:
        """Routed to the session's worker without becoming its round there (a closing, a probe): the
        affinity router keeps the session's holder, so the next round goes where the last round ran."""
        return not self.kv_tags and self.affinity is not None


def round_tags(sampling: SamplingSpec, round_: int, branch: str = "") -> tuple[str, int, str] | None:
    """The KV store's tags for one round of a session (the request's tags name the session)."""
    return None if sampling.kv_tags is None else (sampling.kv_tags[0], round_, branch)


@dataclass
class GenerateDelta:
    """New output since the previous delta of the same request (streaming unit)."""

    text: str
    token_ids: list[int]
    logprobs: list[TopLogprobs]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens not computed: local prefix cache + KV store
    kv_loaded_tokens: int = 0  # of which loaded from the KV store (final delta only)
    worker: str = ""  # the replica that ran it (final delta only)


@dataclass
class GenerateResult:
    """A finished generation: text, token ids and the top-k logprobs of every generated token."""

    text: str
    token_ids: list[int]
    logprobs: list[TopLogprobs]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int = 0
    ttft_ms: float = 0.0
    latency_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    kv_loaded_tokens: int = 0
    worker: str = ""  # the replica that ran it (set by the worker deployment)


@dataclass(frozen=True)
class EngineInfo:
    model: str
    vocab_size: int
    max_model_len: int


class Engine(ABC):
    """An engine serving one model. Implementations must be safe to call concurrently."""

    @abstractmethod
    async def start(self) -> EngineInfo: ...

    @abstractmethod
    def generate_stream(
        self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec
    ) -> AsyncIterator[GenerateDelta]:
        """Yield deltas until the request finishes; the last delta has `finished=True`."""

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    async def generate_n(
        self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec, n: int
    ) -> list[GenerateResult]:
        """n samples of one prompt; engines that share the prompt's prefill should override this."""
        import dataclasses

        return [
            await self.generate(
                f"{request_id}-{i}",
                prompt_token_ids,
                spec if spec.seed is None else dataclasses.replace(spec, seed=spec.seed + i),
            )
            for i in range(n)
        ]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], spec: SamplingSpec
    ) -> GenerateResult:
        """Collect a whole generation (the non-streaming path)."""
        return await collect(self.generate_stream(request_id, prompt_token_ids, spec))


@dataclass
class Accumulator:
    """A generation assembled from its deltas: the one place that does it (the non-streaming path,
    a reasoning round, each of n samples, a Tree-of-Thought node)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TopLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    kv_loaded_tokens: int = 0
    worker: str = ""
    ttft_ms: float = 0.0
    deltas: int = 0

    def add(self, d: GenerateDelta, elapsed_ms: float = 0.0) -> None:
        if not self.token_ids and d.token_ids:
            self.ttft_ms = elapsed_ms
        self.text.append(d.text)
        self.token_ids.extend(d.token_ids)
        self.logprobs.extend(d.logprobs)
        self.finish_reason = d.finish_reason or self.finish_reason
        self.prompt_tokens = d.prompt_tokens or self.prompt_tokens
        self.cached_tokens = d.cached_tokens or self.cached_tokens
        self.kv_loaded_tokens = d.kv_loaded_tokens or self.kv_loaded_tokens
        self.worker = d.worker or self.worker
        self.deltas += 1

    def result(self, latency_ms: float = 0.0) -> GenerateResult:
        return GenerateResult(
            text="".join(self.text),
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs),
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            ttft_ms=self.ttft_ms,
            latency_ms=latency_ms,
            kv_loaded_tokens=self.kv_loaded_tokens,
            worker=self.worker,
        )

    @classmethod
    def of(cls, r: GenerateResult) -> Accumulator:
        """A finished generation as an accumulator (what the round bookkeeping reads)."""
        acc = cls(ttft_ms=r.ttft_ms)
        acc.add(
            GenerateDelta(
                r.text,
                list(r.token_ids),
                list(r.logprobs),
                True,
                r.finish_reason,
                r.prompt_tokens,
                r.cached_tokens,
                r.kv_loaded_tokens,
                r.worker,
            ),
            r.ttft_ms,
        )
        return acc


async def collect(deltas: AsyncIterator[GenerateDelta]) -> GenerateResult:
    acc = Accumulator()
    async for delta in deltas:
        acc.add(delta)
    if not acc.deltas:
        raise RuntimeError("engine produced no output")
    return acc.result()
