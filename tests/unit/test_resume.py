"""A round whose worker dies is resumed on another worker from the tokens already streamed: the pure
helpers, and the router's real worker client (services/ingress/worker_client.py) over a scripted
stand-in for the worker deployment's Serve handle."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from services.ingress.worker_client import WorkerClient
from services.loop.resume import budget_spent, rebase, resumed
from services.worker.engine import GenerateDelta, SamplingSpec


def test_resumed_request_carries_the_streamed_tokens_and_the_rest_of_the_budget():
    spec = SamplingSpec(max_tokens=10, temperature=0.0, kv_tags=("s", 2, ""))
    assert resumed(spec, [1, 2], []) == ([1, 2], spec)
    full, sub = resumed(spec, [1, 2], [7, 8, 9])
    assert full == [1, 2, 7, 8, 9]
    assert sub == dataclasses.replace(spec, max_tokens=7)
    assert resumed(spec, [1, 2], list(range(10))) is None


def test_rebase_reports_the_original_prompt():
    d = GenerateDelta("x", [5], [], finished=True, prompt_tokens=105, cached_tokens=104, kv_loaded_tokens=96)
    assert rebase(d, 0) is d
    r = rebase(d, 8)
    assert (r.prompt_tokens, r.cached_tokens, r.kv_loaded_tokens) == (97, 97, 96)
    first = GenerateDelta("a", [3], [])  # a middle delta carries no prompt count
    assert rebase(first, 8) is first
    spent = GenerateDelta("", [], [], finished=True, finish_reason="length", prompt_tokens=12)
    assert budget_spent(12) == spent


class _Stream:
    """A streaming call that yields `tokens` then, if `dies`, fails as a dead replica does."""

    def __init__(self, tokens: list[int], prompt_len: int, dies: BaseException | None):
        self.items = [
            {"text": f"<{t}>", "token_ids": [t], "logprobs": [], "prompt_tokens": prompt_len if i == 0 else 0}
            for i, t in enumerate(tokens)
        ]
        if dies is None:
            self.items[-1].update(finished=True, finish_reason="stop")
        self.dies = dies

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for item in self.items:
            yield item
        if self.dies is not None:
            raise self.dies


class _Worker:
    """Plays the worker deployment handle: each call answers from a script of (tokens, death)."""

    def __init__(self, script):
        self.script, self.calls, self.sessions = list(script), [], []

    def options(self, stream: bool):
        return SimpleNamespace(generate_stream=SimpleNamespace(remote=self._remote))

    def _remote(self, rid, prompt, spec, session=None, follow=False):
        self.calls.append((rid, list(prompt), spec["max_tokens"]))
        self.sessions.append(session)
        tokens, dies = self.script.pop(0)
        return _Stream(tokens, len(prompt), dies)


def _router(worker, retries=2):
    retried = []
    return WorkerClient(worker, retries, on_retry=retried.append), retried


def _run(client, prompt, spec):
    async def go():
        return [d async for d in client.generate("req", prompt, spec)]

    return asyncio.run(go())


def test_a_dead_worker_s_round_continues_on_another_from_the_streamed_tokens():
    worker = _Worker([([11, 12, 13], ActorDiedError()), ([14, 15], None)])
    shell, retried = _router(worker)
    deltas = _run(shell, [1, 2, 3], SamplingSpec(max_tokens=8))
    assert [t for d in deltas for t in d.token_ids] == [11, 12, 13, 14, 15]  # nothing repeated, nothing lost
    assert worker.calls == [("req", [1, 2, 3], 8), ("req~1", [1, 2, 3, 11, 12, 13], 5)]
    assert deltas[3].prompt_tokens == 3  # the resumed request's prompt counted as the original's
    assert deltas[-1].finished and retried == ["generate"]
    assert worker.sessions == [None, None]  # untagged: no session for the affinity router


def test_the_session_travels_to_the_affinity_router_on_every_attempt():
    worker = _Worker([([11], ActorDiedError()), ([12], None)])
    client, _ = _router(worker)
    _run(client, [1, 2], SamplingSpec(max_tokens=4, kv_tags=("sess-1", 0, "")))
    assert worker.sessions == ["sess-1", "sess-1"]


def test_retries_are_bounded_and_the_last_failure_surfaces():
    worker = _Worker([([11], ActorUnavailableError("x", None))] * 3)
    shell, retried = _router(worker, retries=2)
    with pytest.raises(ActorUnavailableError):
        _run(shell, [1], SamplingSpec(max_tokens=8))
    assert len(worker.calls) == 3 and retried == ["generate", "generate"]


def test_a_worker_that_died_after_the_last_token_ends_the_round_at_its_budget():
    worker = _Worker([([11, 12], ActorDiedError())])
    shell, _ = _router(worker)
    deltas = _run(shell, [1], SamplingSpec(max_tokens=2))
    assert len(worker.calls) == 1
    assert deltas[-1] == budget_spent(1)


def test_other_errors_are_not_retried():
    worker = _Worker([([11], ValueError("bad request"))])
    shell, retried = _router(worker)
    with pytest.raises(ValueError):
        _run(shell, [1], SamplingSpec(max_tokens=4))
    assert len(worker.calls) == 1 and retried == []
