"""VllmEngine against a real vLLM AsyncLLM on CPU, serving SmolLM2-135M-Instruct.

The engine, its event loop and the model folder are the session fixtures of tests/engine/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.worker.engine import EngineInfo, GenerateDelta, GenerateResult, SamplingSpec
from services.worker.engine_config import EngineConfig, MiB
from services.worker.vllm_engine import VllmEngine, cpu_thread_env, prepare_environment, top_logprobs

pytestmark = pytest.mark.engine

T = TypeVar("T")
MODEL = "smollm2-135m-instruct"
TOP_K = 5


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer: Any) -> list[int]:
    return _chat(tokenizer, "Explain in two sentences why the sky is blue.")


def _chat(tokenizer: Any, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _rid() -> str:
    return uuid.uuid4().hex


def _run(loop: asyncio.Runner, coro: Coroutine[Any, Any, T]) -> T:
    return loop.run(asyncio.wait_for(coro, timeout=180))


async def _deltas(eng: VllmEngine, prompt: list[int], spec: SamplingSpec) -> list[GenerateDelta]:
    return [d async for d in eng.generate_stream(_rid(), prompt, spec)]


async def _until_idle(eng: VllmEngine, timeout_s: float = 10.0) -> int:
    """Unfinished requests left once the engine settles (aborts land asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while eng.num_unfinished_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return eng.num_unfinished_requests()


# ---------------------------------------------------------------- engine-free helpers


def test_top_logprobs_dedups_and_sorts_flat_logprobs() -> None:
    from vllm.logprobs import FlatLogprobs

    flat = FlatLogprobs()
    # As vLLM appends them: the sampled token first, then the top-k (which may repeat it).
    flat.append_fast([7, 3, 7], [-2.0, -0.5, -2.0], iter([2, 1, 2]), [None] * 3)
    flat.append_fast([9, 1, 2], [-4.0, -0.1, -0.3], iter([5, 1, 2]), [None] * 3)
    assert top_logprobs(flat) == [((3, -0.5), (7, -2.0)), ((1, -0.1), (2, -0.3), (9, -4.0))]
    out = top_logprobs(list(flat))  # the non-flat form: a dict of Logprob per position
    assert out == top_logprobs(flat)
    assert all(type(t) is int and type(lp) is float for pos in out for t, lp in pos)


def test_cpu_thread_env() -> None:
    inproc = EngineConfig(model=MODEL, omp_threads=2)
    assert cpu_thread_env(inproc, [0, 1, 2]) == {"OMP_NUM_THREADS": "2"}
    assert cpu_thread_env(inproc, [5]) == {"OMP_NUM_THREADS": "1"}  # clamped to allowed CPUs
    proc = EngineConfig(model=MODEL, omp_threads=2, worker_process=True)
    assert cpu_thread_env(proc, [4, 6, 7]) == {"VLLM_CPU_OMP_THREADS_BIND": "4,6"}
    assert cpu_thread_env(EngineConfig(model=MODEL), [0, 1]) == {}


def test_prepare_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OMP_NUM_THREADS", "VLLM_NO_USAGE_STATS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(key, raising=False)  # registered, so monkeypatch restores them
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # an explicit choice is kept
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # would override kv_cache_memory_bytes
    prepare_environment(EngineConfig(model=MODEL, omp_threads=1))
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["VLLM_NO_USAGE_STATS"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_config_rejects_unknown_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        EngineConfig(model=MODEL, kv_cache_memory_bytes=MiB)
    with pytest.raises(ValueError):
        EngineConfig(model=MODEL, max_logprobs=21)
    with pytest.raises(ValueError):
        EngineConfig(model=MODEL, gpu_memory_utilization=0.5)  # type: ignore[call-arg]


# ---------------------------------------------------------------- the real engine


def test_start_reports_model(engine: VllmEngine, loop: asyncio.Runner, model_dir: Path) -> None:
    import json

    hf = json.loads((model_dir / "config.json").read_text())
    info = _run(loop, engine.start())  # idempotent: same engine, same info
    assert info == EngineInfo(model=MODEL, vocab_size=hf["vocab_size"], max_model_len=2048)
    assert engine.block_size > 0


def test_greedy_is_deterministic_and_consistent(
    engine: VllmEngine, loop: asyncio.Runner, tokenizer: Any, prompt: list[int]
) -> None:
    spec = SamplingSpec(max_tokens=32, top_logprobs=TOP_K)
    a = _run(loop, engine.generate(_rid(), prompt, spec))
    b = _run(loop, engine.generate(_rid(), prompt, spec))
    assert a.token_ids and a.token_ids == b.token_ids
    assert a.text == b.text == tokenizer.decode(a.token_ids, skip_special_tokens=True)
    assert a.prompt_tokens == len(prompt)
    _check_logprobs(a, TOP_K, greedy=True)


def _check_logprobs(result: GenerateResult, k: int, *, greedy: bool) -> None:
    assert len(result.logprobs) == len(result.token_ids)
    for token, alternatives in zip(result.token_ids, result.logprobs, strict=True):
        values = [lp for _, lp in alternatives]
        assert len(alternatives) >= k
        assert values == sorted(values, reverse=True)
        assert all(type(t) is int and type(lp) is float for t, lp in alternatives)
        chosen = dict(alternatives)
        assert token in chosen and chosen[token] <= 0.0
        if greedy:  # the sampled token is the argmax (ties: equal logprob)
            assert chosen[token] == values[0]


def test_stream_concatenates_to_the_whole(
    engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]
) -> None:
    spec = SamplingSpec(max_tokens=24, top_logprobs=3)
    whole = _run(loop, engine.generate(_rid(), prompt, spec))
    deltas = _run(loop, _deltas(engine, prompt, spec))
    assert len(deltas) > 1, "DELTA output: one delta per step"
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == whole.finish_reason
    assert {d.prompt_tokens for d in deltas} == {len(prompt)}


def test_max_tokens_ends_with_length(engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]) -> None:
    spec = SamplingSpec(max_tokens=7, ignore_eos=True, top_logprobs=1)
    result = _run(loop, engine.generate(_rid(), prompt, spec))
    assert len(result.token_ids) == 7
    assert result.finish_reason == "length"
    _check_logprobs(result, 1, greedy=True)


def test_stop_string_ends_with_stop(engine: VllmEngine, loop: asyncio.Runner, tokenizer: Any) -> None:
    prompt = _chat(tokenizer, "Count from 1 to 20, separated by commas.")
    free = _run(loop, engine.generate(_rid(), prompt, SamplingSpec(max_tokens=40)))
    assert "5" in free.text, free.text
    stopped = _run(loop, engine.generate(_rid(), prompt, SamplingSpec(max_tokens=40, stop=("5",))))
    assert stopped.finish_reason == "stop"
    assert "5" not in stopped.text and free.text.startswith(stopped.text)


def test_prefix_cache_reports_cached_tokens(engine: VllmEngine, loop: asyncio.Runner, tokenizer: Any) -> None:
    block = engine.block_size
    # A prefix nobody sent before (the nonce), longer than two blocks.
    filler = f"Session {uuid.uuid4().hex}. " + " ".join(f"Fact {i}: item {i} is red." for i in range(200))
    shared = tokenizer.encode(filler, add_special_tokens=False)[: 2 * block + block // 2]
    first = shared + tokenizer.encode(" Question one?", add_special_tokens=False)
    second = shared + tokenizer.encode(" Another question?", add_special_tokens=False)
    spec = SamplingSpec(max_tokens=2)
    a = _run(loop, engine.generate(_rid(), first, spec))
    b = _run(loop, engine.generate(_rid(), second, spec))
    assert a.cached_tokens == 0
    assert b.cached_tokens >= 2 * block  # whole blocks of the shared prefix
    assert b.cached_tokens % block == 0 and b.cached_tokens <= len(shared)
    assert b.prompt_tokens == len(second)


def test_abandoned_stream_is_aborted(engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]) -> None:
    spec = SamplingSpec(max_tokens=400, ignore_eos=True)

    async def take_two_then_break() -> list[GenerateDelta]:
        seen = []
        async for delta in engine.generate_stream(_rid(), prompt, spec):
            seen.append(delta)
            if len(seen) == 2:
                break  # no aclose(): asyncio's async-generator finalizer must clean up
        return seen

    seen = _run(loop, take_two_then_break())
    assert len(seen) == 2 and not seen[-1].finished
    assert _run(loop, _until_idle(engine)) == 0
    after = _run(loop, engine.generate(_rid(), prompt, SamplingSpec(max_tokens=4)))
    assert len(after.token_ids) == 4 and after.finish_reason == "length"


def test_cancelled_consumer_aborts_request(
    engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]
) -> None:
    spec = SamplingSpec(max_tokens=400, ignore_eos=True)

    async def cancel_midway() -> int:
        got = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate_stream(_rid(), prompt, spec):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        assert engine.num_unfinished_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await _until_idle(engine)

    assert _run(loop, cancel_midway()) == 0


def test_explicit_abort_finishes_stream(engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]) -> None:
    async def abort_midway() -> list[GenerateDelta]:
        rid, seen = _rid(), []
        async for delta in engine.generate_stream(rid, prompt, SamplingSpec(max_tokens=400)):
            seen.append(delta)
            if len(seen) == 2:
                await engine.abort(rid)
        return seen

    seen = _run(loop, abort_midway())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in seen) < 400
    assert _run(loop, _until_idle(engine)) == 0


def test_seeded_sampling_is_reproducible(engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]) -> None:
    def sample(seed: int) -> list[int]:
        spec = SamplingSpec(max_tokens=32, temperature=1.0, seed=seed, ignore_eos=True)
        return _run(loop, engine.generate(_rid(), prompt, spec)).token_ids

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_concurrent_requests_all_finish(engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]) -> None:
    async def batch() -> list[GenerateResult]:
        specs = [SamplingSpec(max_tokens=n, ignore_eos=True) for n in (3, 9, 17)]
        return await asyncio.gather(*(engine.generate(_rid(), prompt, s) for s in specs))

    results = _run(loop, batch())
    assert [len(r.token_ids) for r in results] == [3, 9, 17]
    assert _run(loop, _until_idle(engine)) == 0


def test_rejected_requests_raise_value_error(
    engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]
) -> None:
    too_long = prompt * (2048 // len(prompt) + 1)
    with pytest.raises(ValueError, match="maximum context length"):
        _run(loop, engine.generate(_rid(), too_long, SamplingSpec(max_tokens=4)))
    with pytest.raises(ValueError):  # more than max_logprobs
        _run(loop, engine.generate(_rid(), prompt, SamplingSpec(max_tokens=2, top_logprobs=21)))
    with pytest.raises(ValueError):  # vLLM would read -1 as "the whole vocabulary"
        _run(loop, engine.generate(_rid(), prompt, SamplingSpec(max_tokens=2, top_logprobs=-1)))
    ok = _run(loop, engine.generate(_rid(), prompt, SamplingSpec(max_tokens=2)))
    assert len(ok.token_ids) == 2
    assert _run(loop, _until_idle(engine)) == 0


def test_generate_n_samples_children_of_one_prompt(
    engine: VllmEngine, loop: asyncio.Runner, prompt: list[int]
) -> None:
    spec = SamplingSpec(max_tokens=8, temperature=1.0, seed=5, top_logprobs=3)
    children = loop.run(engine.generate_n("n3", prompt, spec, 3))
    assert len(children) == 3
    assert all(len(c.token_ids) == len(c.logprobs) > 0 and c.prompt_tokens == len(prompt) for c in children)
    assert len({tuple(c.token_ids) for c in children}) > 1  # distinct seeds: distinct samples
    again = loop.run(engine.generate_n("n3b", prompt, spec, 3))
    assert [c.token_ids for c in again] == [c.token_ids for c in children]  # seeded: reproducible
    # child i is sampled with seed + i: child 1 equals a single request seeded 6
    single = loop.run(
        engine.generate("s6", prompt, SamplingSpec(max_tokens=8, temperature=1.0, seed=6, top_logprobs=3))
    )
    assert single.token_ids == children[1].token_ids
    with pytest.raises(ValueError, match="n must be"):
        loop.run(engine.generate_n("n0", prompt, spec, 0))
