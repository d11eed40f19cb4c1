"""A real vLLM engine and the Orchestrator in this process (no Ray), running benchmark problems.

Shared by `ponder bench tax` and `ponder calibrate`. The orchestrator, the tokenizer and the tier policy
are exactly the router's; depth control is the same pure policy, decided locally. Several problems are
kept in flight so the engine batches them, as a served worker would.

The functions marked "API point" are where this module touches orchestrator/tier interfaces that are
still moving: each is one small function, so a change there is a one-line fix.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.problems import Problem, score
from services.loop.orchestrator import Finished, Orchestrator, Outcome, RoundDone
from services.reasoning.prompts import Message
from services.reasoning.signals import Signals, extract_answer
from services.reasoning.thinking import TraceMarkers, markers_in_template
from services.reasoning.tiers import RoundPlan, TierTable, make_plan
from services.worker.engine import SamplingSpec
from services.worker.engine_config import EngineConfig, MiB

QWEN = "qwen2.5-coder-0.5b-instruct"


# ---------------------------------------------------------------- API points


def plan_for(
    table: TierTable,
    tier: str,
    *,
    max_rounds: int | None = None,
    min_rounds: int | None = None,
    confidence_threshold: float | None = None,
    strategy: str = "cot",
    domain: str | None = None,
) -> RoundPlan:
    """API point: the plan of one benchmark request (services.reasoning.tiers.make_plan)."""
    return make_plan(
        table,
        tier,
        max_rounds=max_rounds,
        min_rounds=min_rounds,
        confidence_threshold=confidence_threshold,
        strategy=strategy,
        domain=domain,
    )


def decide_fn() -> Callable[..., Any]:
    """API point: depth control as the pure policy, decided in this process."""
    from services.loop.orchestrator import local_decide

    return local_decide


def make_orchestrator(
    engine: Any, tokenizer: Any, info: Any, trace: TraceMarkers | None = None, prompts: Any = None
) -> Orchestrator:
    """API point: the orchestrator as the router builds it (ToT expands n children in one request;
    `trace`: the model thinks natively, as the router detects it; `prompts`: the model family's)."""
    from services.reasoning.prompts import DEFAULT_PROMPTS

    return Orchestrator(
        engine.generate_stream,
        decide_fn(),
        tokenizer,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        expand=engine.generate_n,
        trace=trace,
        trace_opened=trace is not None and tokenizer.opens(trace.start),
        prompts=prompts or DEFAULT_PROMPTS,
    )


def total_completion_tokens(outcome: Outcome) -> int:
    """API point: every completion token the request cost, all ToT nodes included."""
    return outcome.total_completion_tokens


def tot_summary(outcome: Outcome) -> dict[str, Any] | None:
    """API point: the ToT search's summary (nodes, depth, ...), None for chain-of-thought."""
    return dict(outcome.tot) if outcome.tot else None


# ---------------------------------------------------------------- settings and engine


def default_model() -> str:
    """Qwen2.5-Coder-0.5B when provisioned (graded accuracy on arithmetic), else SmolLM2."""
    from cluster.models import SMALL_MODEL, is_installed

    return QWEN if is_installed(QWEN) else SMALL_MODEL


@dataclass(frozen=True)
class Settings:
    engine: EngineConfig
    tiers_file: str
    domains_file: str
    complexity_file: str
    prompts: Any  # the round prompts of the engine's model family, as the router picks them


def load_settings(config: str, model: str, *, dtype: str, kv_cache_mib: int, max_model_len: int) -> Settings:
    """The app config's files and engine, re-sized for one in-process engine running a benchmark."""
    from cluster.models import ensure_model
    from services.config import AppConfig
    from services.reasoning.prompts import PromptFamilies

    cfg = AppConfig.load(config)
    engine = cfg.engine.model_copy(
        update={
            "model": model,
            "model_path": str(ensure_model(model)),
            "dtype": dtype,
            "kv_cache_memory_bytes": kv_cache_mib * MiB,
            "max_model_len": max_model_len,
            "enforce_eager": True,
            "worker_process": False,
        }
    )
    return Settings(
        engine=EngineConfig.model_validate(engine.model_dump()),
        tiers_file=cfg.depth_control.tiers_file,
        domains_file=cfg.depth_control.domains_file,
        complexity_file=cfg.router.complexity_file,
        prompts=PromptFamilies.load(cfg.router.prompts_file).for_model(model),
    )


def settings_from_args(args: Any) -> Settings:
    """load_settings from the engine options every bench command takes (add_engine_arguments)."""
    return load_settings(
        args.config,
        args.model,
        dtype=args.dtype,
        kv_cache_mib=args.kv_cache_mib,
        max_model_len=args.max_model_len,
    )


# ---------------------------------------------------------------- jobs and results


@dataclass(frozen=True)
class Job:
    problem: Problem
    policy: str
    plan: RoundPlan
    sampling: SamplingSpec
    request_id: str


@dataclass
class RoundRow:
    index: int
    answer: str | None
    correct: bool
    confidence: float | None
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    latency_ms: float
    done_ms: float  # time from the request's start to this round's verdict
    text: str = field(repr=False, default="")
    signals: Signals | None = field(repr=False, default=None)  # to replay exit policies
    closed: bool = False  # cut before its answer line and closed by the router (loop/closing.py)


@dataclass
class JobResult:
    problem_id: str
    policy: str
    rounds: list[RoundRow]
    exit_reason: str
    correct: bool
    answer: str | None
    completion_tokens: int
    latency_ms: float
    tot: dict[str, Any] | None
    thinking: dict[str, Any] | None = None  # thinking mode: trace tokens, segments, probes, closed_by

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "correct": self.correct,
            "answer": self.answer,
            "exit_reason": self.exit_reason,
            "rounds": len(self.rounds),
            "completion_tokens": self.completion_tokens,
            "latency_ms": round(self.latency_ms, 1),
            "tot": self.tot,
            "thinking": self.thinking,
            "per_round": [
                {
                    "answer": r.answer,
                    "correct": r.correct,
                    "confidence": None if r.confidence is None else round(r.confidence, 4),
                    "completion_tokens": r.completion_tokens,
                    "done_ms": round(r.done_ms, 1),
                }
                for r in self.rounds
            ],
        }


class Runner:
    """One engine + orchestrator, started and used from one event loop."""

    def __init__(self, engine_config: EngineConfig, prompts: Any = None) -> None:
        self.config = engine_config
        self.prompts = prompts
        self.engine: Any = None
        self.orchestrator: Orchestrator | None = None
        self.startup_s = 0.0

    async def start(self) -> None:
        from services.loop.tokenizer import HfTokenizer
        from services.worker.vllm_engine import VllmEngine

        path = self.config.model_path
        assert path, "settings resolve the model path"
        t0 = time.perf_counter()
        self.engine = VllmEngine(self.config, path)
        info = await self.engine.start()
        tokenizer = HfTokenizer(path, self.config.chat_template)
        trace = self.config.reasoning or markers_in_template(tokenizer.chat_template)
        self.orchestrator = make_orchestrator(self.engine, tokenizer, info, trace, self.prompts)
        self.startup_s = time.perf_counter() - t0
        # A fresh engine's first request pays ~2-3 s of one-off warm-up: keep it out of the latencies.
        await self.engine.generate("warmup", [1, 2, 3, 4], SamplingSpec(max_tokens=4))

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()

    async def run(self, job: Job) -> JobResult:
        assert self.orchestrator is not None, "start() first"
        conversation = [Message("user", job.problem.question)]
        start = time.perf_counter()
        done_ms: list[float] = []
        outcome: Outcome | None = None
        async for event in self.orchestrator.run(job.request_id, conversation, job.plan, job.sampling):
            if isinstance(event, RoundDone):
                done_ms.append((time.perf_counter() - start) * 1000.0)
            elif isinstance(event, Finished):
                outcome = event.outcome
        latency = (time.perf_counter() - start) * 1000.0
        assert outcome is not None, "the orchestrator always ends with Finished"
        return _result(job, outcome, done_ms, latency)

    async def run_all(self, jobs: Sequence[Job], concurrency: int, desc: str = "requests") -> list[JobResult]:
        """Run every job, `concurrency` in flight, with a progress bar on stderr; results in job order."""
        from tqdm import tqdm

        gate = asyncio.Semaphore(max(1, concurrency))
        with tqdm(total=len(jobs), desc=desc, unit="req", dynamic_ncols=True) as bar:

            async def one(job: Job) -> JobResult:
                async with gate:
                    res = await self.run(job)
                bar.update(1)
                bar.set_postfix_str(f"{job.policy} {job.problem.id}", refresh=False)
                return res

            return list(await asyncio.gather(*(one(j) for j in jobs)))


async def run_jobs(
    engine: EngineConfig, jobs: Sequence[Job], concurrency: int, desc: str, problems: int, prompts: Any = None
) -> tuple[list[JobResult], dict[str, Any]]:
    """Start an engine, run every job on it, stop it: the results, and the run's timings."""
    runner = Runner(engine, prompts)
    await runner.start()
    try:
        t0 = time.perf_counter()
        results = await runner.run_all(jobs, concurrency, desc=desc)
        run_s = time.perf_counter() - t0
    finally:
        await runner.shutdown()
    tokens = sum(r.completion_tokens for r in results)
    return results, {
        "engine_start_s": round(runner.startup_s, 1),
        "run_s": round(run_s, 1),
        "per_problem_s": round(run_s / max(problems, 1), 1),
        "requests": len(jobs),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / run_s, 1) if run_s else 0.0,
    }


def _result(job: Job, outcome: Outcome, done_ms: list[float], latency_ms: float) -> JobResult:
    rows = []
    for i, r in enumerate(outcome.rounds):
        rows.append(
            RoundRow(
                index=r.index,
                answer=r.answer,
                correct=score(job.problem, r.text),
                confidence=r.confidence,
                completion_tokens=r.completion_tokens,
                prompt_tokens=r.prompt_tokens,
                cached_tokens=r.cached_tokens,
                latency_ms=r.latency_ms,
                done_ms=done_ms[i] if i < len(done_ms) else latency_ms,
                text=r.text,
                signals=r.signals,
                closed=r.closed,
            )
        )
    return JobResult(
        problem_id=job.problem.id,
        policy=job.policy,
        rounds=rows,
        exit_reason=str(outcome.exit_reason),
        correct=score(job.problem, outcome.content),
        answer=extract_answer(outcome.content),
        completion_tokens=total_completion_tokens(outcome),
        latency_ms=latency_ms,
        tot=tot_summary(outcome),
        thinking=outcome.thinking,
    )


def engine_settings_note(settings: Settings) -> dict[str, Any]:
    e = settings.engine
    return {
        "dtype": e.dtype,
        "kv_cache_mib": e.kv_cache_memory_bytes // MiB,
        "max_model_len": e.max_model_len,
        "enforce_eager": e.enforce_eager,
        "max_num_seqs": e.max_num_seqs,
    }


def repo_path(*parts: str) -> Path:
    return Path(__file__).resolve().parent.parent.joinpath(*parts)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    # fp32: these rounds are short and their transcripts grow, so prefill weighs more than decode, and
    # bf16 prefill is ~5x slower on this CPU (docs/cpu-engine-notes.md); on 8 problems fp32 ran a
    # little faster (docs/benchmarks.md).
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="engine dtype")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache size in MiB")
    p.add_argument("--max-model-len", type=int, default=4096, help="longest prompt + completion")


def greedy(max_tokens: int) -> SamplingSpec:
    return SamplingSpec(max_tokens=max_tokens, temperature=0.0, top_logprobs=5)


TOT_TEMPERATURE = 0.7  # a tree's siblings must differ: greedy ones would be identical


def tot_sampling(max_tokens: int, seed: int) -> SamplingSpec:
    """A benchmark's Tree-of-Thought request: sampled, seeded per problem."""
    return SamplingSpec(max_tokens=max_tokens, temperature=TOT_TEMPERATURE, seed=seed, top_logprobs=5)
