"""Thinking mode: a model that thinks natively writes one trace, cut into segments that depth control
governs as rounds, then answers after the trace is closed (services/reasoning/thinking.py).

Each segment is one engine request of at most `segment_tokens` thinking tokens, its prompt the
request's prompt plus the trace so far (the prefix cache, or the KV store, holds it: only the new
tokens are computed), stopped at the trace's end marker. After each segment the round loop settles
a verdict on the segment's signals, within the plan's guards: the ceiling is the most thinking the
tier (or `thinking_token_budget`) allows, min_rounds the least. A model that closes its trace before
the least thinking is told to go on (s1's budget forcing); one that closes it after ends thinking
itself. When depth control ends it, a short transition and the end marker close the trace. The
answer is then generated from the closed trace with the request's own token cap: a budget bounds
thinking, never the answer. With `max_completion_tokens` (OpenAI's meaning here: trace plus answer)
the trace is closed early enough to leave the answer the orchestrator's reserve.

A tier with `probe_tokens` probes after a segment (Dynasor): the trace so far, closed, then "Final
answer:", greedy, a few tokens, never saved to the KV store and never part of the trace. The probe's
answer is the segment's answer, so the exit rule's `stable_for` counts probes that agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.loop.events import ContentDelta, DecideFn, Event, Finished, Outcome, ReasoningDelta, RoundDone
from services.reasoning.loop import RoundLoop, RoundRecord
from services.reasoning.signals import stable_rounds
from services.reasoning.thinking import (
    KEEP_THINKING,
    TRANSITION,
    max_thinking_tokens,
    min_thinking_tokens,
    probe_answer,
    probe_suffix,
)
from services.reasoning.tiers import Action, Reason, RoundPlan, Verdict
from services.worker.engine import Accumulator, SamplingSpec, round_tags

if TYPE_CHECKING:
    from services.loop.orchestrator import Orchestrator


@dataclass
class _Trace:
    """The trace as it grows: its token ids (appended to the prompt), its text (what was streamed)
    and the thinking tokens generated so far."""

    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    thought: int = 0
    probes: list[dict] = field(default_factory=list)  # {segment, answer, tokens}
    probe_prompt_tokens: int = 0

    @property
    def probe_tokens(self) -> int:
        return sum(p["tokens"] for p in self.probes)

    def add(self, orch: Orchestrator, text: str, ids: list[int] | None = None) -> None:
        self.ids += orch.encode(text) if ids is None else ids
        self.text.append(text)


async def _segment(
    orch: Orchestrator, rid: str, prompt: list[int], trace: _Trace, spec: SamplingSpec, least: int, seg: _Seg
) -> AsyncIterator[ReasoningDelta]:
    """One segment: up to `spec.max_tokens` thinking tokens, in several requests when the model
    closes its trace before the least thinking (it is told to go on: s1's budget forcing)."""
    n, start = spec.max_tokens, orch.now()
    while True:
        before, done = len(seg.acc.token_ids), "".join(seg.acc.text)
        sub = dataclasses.replace(spec, max_tokens=n - before)
        async for delta in orch.generate(f"{rid}.{seg.parts}", prompt + trace.ids, sub):
            seg.acc.add(delta, (orch.now() - start) * 1000.0)
            if delta.text:
                yield ReasoningDelta(delta.text)
        new = "".join(seg.acc.text)[len(done) :]
        seg.closed = seg.acc.finish_reason == "stop"  # the end marker (or EOS), not the cap
        # A closed request's ids end with the marker's (or EOS) tokens, which its text has not: the
        # trace goes on from its text (re-tokenized; what came before stays cached).
        trace.add(orch, new, None if seg.closed else seg.acc.token_ids[before:])
        seg.parts += 1
        if not (seg.closed and trace.thought + len(seg.acc.token_ids) < least and len(seg.acc.token_ids) < n):
            return
        trace.add(orch, KEEP_THINKING)
        yield ReasoningDelta(KEEP_THINKING)


@dataclass
class _Seg:
    acc: Accumulator = field(default_factory=Accumulator)
    closed: bool = False
    parts: int = 0


async def run_thinking(
    orch: Orchestrator,
    request_id: str,
    plan: RoundPlan,
    sampling: SamplingSpec,
    first_prompt: list[int],
    decide: DecideFn,
) -> AsyncIterator[Event]:
    markers = orch.trace
    assert markers is not None
    prompt = trace_prompt(orch, first_prompt)
    total = sampling.completion_budget  # trace + probes + answer, when the request set it
    reserve = answer_reserve(orch, sampling)
    most = max_thinking_tokens(plan) if total is None else min(max_thinking_tokens(plan), total - reserve)
    least = min(min_thinking_tokens(plan), most)
    # Probes are not thinking (the thinking budget is exact without them), but they are completion
    # tokens: under max_completion_tokens they come out of the trace's share.
    left = _room(most, total, reserve)
    loop, trace, closed_by_model = RoundLoop(plan), _Trace(), False
    while not loop.done:
        index = loop.next_index
        # What is left of the budget and of the context, keeping the answer room for its first tokens.
        n = min(plan.segment_tokens, left(trace), orch.spare(prompt + trace.ids))
        if n <= 0:  # no thinking room left (the budget, or the context)
            loop.stop(Reason.CEILING if left(trace) <= 0 else Reason.CONTEXT)
            break
        spec = dataclasses.replace(
            sampling, max_tokens=n, stop=(markers.end,), kv_tags=round_tags(sampling, index)
        )
        seg, start, seg_prompt = _Seg(), orch.now(), prompt + trace.ids
        async for ev in _segment(orch, f"{request_id}-s{index}", prompt, trace, spec, least, seg):
            yield ev
        record = orch.record(
            index, seg.acc, seg_prompt, (orch.now() - start) * 1000.0, loop.rounds, answers=False
        )
        trace.thought += record.completion_tokens
        if seg.closed and trace.thought >= least:  # the model ended its thinking itself
            verdict = loop.settle(record, Verdict(Action.EXIT, Reason.TRACE_CLOSED))
            closed_by_model = loop.done
        else:
            if seg.closed:  # closed at the segment's cap, still short of the least: go on
                trace.add(orch, KEEP_THINKING)
                yield ReasoningDelta(KEEP_THINKING)
            if _probing(plan, index, left(trace) > 0):
                await _probe(
                    orch, f"{request_id}-p{index}", prompt + trace.ids, sampling, record, loop, trace
                )
            verdict = loop.settle(record, await decide(plan, index + 1, record.signals))
        yield RoundDone(record, verdict, segment=True)
    if not closed_by_model:
        trace.add(orch, TRANSITION, [])
        yield ReasoningDelta(TRANSITION)
    record: RoundRecord | None = None
    spent = trace.thought + trace.probe_tokens
    async for ev in answer_after(
        orch, request_id, len(loop.rounds), prompt + trace.ids, closed_by_model, sampling, spent
    ):
        if isinstance(ev, RoundRecord):
            record = ev
        else:
            yield ev
    assert record is not None and loop.exit_reason is not None
    rounds = [*loop.rounds, record]
    summary = {
        "thinking_tokens": trace.thought,
        "segments": len(loop.rounds),
        "segment_tokens": plan.segment_tokens,
        "budget": {"min": least, "max": most, "answer_reserve": reserve},
        "closed_by": loop.exit_reason.value,  # trace_closed: the model closed it itself
        "answer_cached_tokens": record.cached_tokens,
        "probes": trace.probes,
        "probe_tokens": trace.probe_tokens,
    }
    yield Finished(
        Outcome(
            plan,
            rounds,
            loop.exit_reason,
            record.text,
            "".join(trace.text),
            thinking=summary,
            all_prompt_tokens=sum(r.prompt_tokens for r in rounds) + trace.probe_prompt_tokens,
            all_completion_tokens=sum(r.completion_tokens for r in rounds) + trace.probe_tokens,
        )
    )


def answer_reserve(orch: Orchestrator, sampling: SamplingSpec) -> int:
    """Tokens kept for the answer under max_completion_tokens (at most half of it); 0 without it."""
    total = sampling.completion_budget
    return 0 if total is None else min(orch.answer_reserve, total // 2)


def trace_prompt(orch: Orchestrator, first_prompt: list[int]) -> list[int]:
    """The request's prompt with the trace opened (unless its chat template opens it)."""
    assert orch.trace is not None
    return list(first_prompt) if orch.trace_opened else first_prompt + orch.encode(orch.trace.start + "\n")


def _room(most: int, total: int | None, reserve: int) -> Callable[[_Trace], int]:
    """Thinking tokens the trace may still take: its budget, and under max_completion_tokens its
    share of the request's tokens (probes included)."""

    def left(trace: _Trace) -> int:
        n = most - trace.thought
        return n if total is None else min(n, total - reserve - trace.thought - trace.probe_tokens)

    return left


def _probing(plan: RoundPlan, index: int, more_to_come: bool) -> bool:
    """Whether to probe after segment `index`: the tier probes, its exit rule counts stable answers,
    another segment may follow, and this probe's answer can take part in the first exit allowed."""
    rule = plan.rule()
    if plan.probe_tokens <= 0 or rule is None or rule.stable_for is None or not more_to_come:
        return False
    return index + rule.stable_for >= plan.min_rounds


async def probe(
    orch: Orchestrator, rid: str, trace_prompt: list[int], tokens: int, sampling: SamplingSpec
) -> tuple[str | None, int, int]:
    """Ask a trace (the prompt that ends with it) for its answer now: (answer or None when it
    hesitated, completion tokens, prompt tokens). Greedy, never stored, never part of the trace."""
    assert orch.trace is not None
    prompt = trace_prompt + orch.encode(probe_suffix(orch.trace))
    spec = SamplingSpec(
        max_tokens=min(tokens, max(orch.spare(prompt), 1)),
        temperature=0.0,  # the model's most likely answer now
        stop=("\n\n",),
        top_logprobs=1,
        kv_tags=None,  # never extended: not worth a place in the KV store
        affinity=sampling.session,  # the worker whose prefix cache holds the trace
    )
    acc = Accumulator()
    async for delta in orch.generate(rid, prompt, spec):
        acc.add(delta, 0.0)
    return probe_answer("".join(acc.text)), len(acc.token_ids), acc.prompt_tokens or len(prompt)


async def _probe(
    orch: Orchestrator,
    rid: str,
    trace_prompt: list[int],
    sampling: SamplingSpec,
    record: RoundRecord,
    loop: RoundLoop,
    trace: _Trace,
) -> None:
    """Probe after a segment: the segment's answer and answer stability become the probe's."""
    answer, tokens, prompt_tokens = await probe(orch, rid, trace_prompt, loop.plan.probe_tokens, sampling)
    trace.probes.append({"segment": record.index, "answer": answer, "tokens": tokens})
    trace.probe_prompt_tokens += prompt_tokens
    record.answer = answer
    assert record.signals is not None
    record.signals = dataclasses.replace(
        record.signals, stable_rounds=stable_rounds([*(r.answer for r in loop.rounds), answer])
    )


async def answer_after(
    orch: Orchestrator,
    request_id: str,
    index: int,
    traced: list[int],
    closed_by_model: bool,
    sampling: SamplingSpec,
    spent: int,
) -> AsyncIterator[ContentDelta | RoundRecord]:
    """The answer after the trace that ends `traced`, closed here (the transition first unless its
    model closed it), within the request's token cap and what max_completion_tokens leaves after the
    `spent` thinking and probe tokens; streamed as content, its record (decision `answer`) last."""
    assert orch.trace is not None
    prompt = traced + orch.encode(("" if closed_by_model else TRANSITION) + orch.trace.end + "\n")
    total = sampling.completion_budget
    cap = sampling.max_tokens if total is None else max(1, min(sampling.max_tokens, total - spent))
    spec = dataclasses.replace(
        sampling, max_tokens=orch.room(cap, prompt), kv_tags=round_tags(sampling, index)
    )
    acc, start = Accumulator(), orch.now()
    async for delta in orch.generate(f"{request_id}-a", prompt, spec):
        acc.add(delta, (orch.now() - start) * 1000.0)
        if delta.text:
            yield ContentDelta(delta.text)
    record = orch.record(index, acc, prompt, (orch.now() - start) * 1000.0, [])
    record.decision, record.decided_by = "answer", "router"
    yield record
