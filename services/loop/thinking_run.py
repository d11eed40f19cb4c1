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
thinking, never the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.loop.events import ContentDelta, DecideFn, Event, Finished, Outcome, ReasoningDelta, RoundDone
from services.reasoning.loop import RoundLoop, RoundRecord
from services.reasoning.thinking import KEEP_THINKING, TRANSITION, max_thinking_tokens, min_thinking_tokens
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
    prompt = list(first_prompt) if orch.trace_opened else first_prompt + orch.encode(markers.start + "\n")
    most, least = max_thinking_tokens(plan), min_thinking_tokens(plan)
    loop, trace, closed_by_model = RoundLoop(plan), _Trace(), False
    while not loop.done:
        index = loop.next_index
        # What is left of the budget and of the context, keeping the answer room for its first tokens.
        n = min(plan.segment_tokens, most - trace.thought, orch.spare(prompt + trace.ids))
        if n <= 0:  # no thinking room left (the budget, or the context)
            loop.stop(Reason.CEILING if trace.thought >= most else Reason.CONTEXT)
            break
        spec = dataclasses.replace(
            sampling, max_tokens=n, stop=(markers.end,), kv_tags=round_tags(sampling, index)
        )
        seg, start, seg_prompt = _Seg(), orch.now(), prompt + trace.ids
        async for ev in _segment(orch, f"{request_id}-s{index}", prompt, trace, spec, least, seg):
            yield ev
        record = orch.record(index, seg.acc, seg_prompt, (orch.now() - start) * 1000.0, loop.rounds)
        trace.thought += record.completion_tokens
        if seg.closed and trace.thought >= least:  # the model ended its thinking itself
            verdict = loop.settle(record, Verdict(Action.EXIT, Reason.TRACE_CLOSED))
            closed_by_model = loop.done
        else:
            if seg.closed:  # closed at the segment's cap, still short of the least: go on
                trace.add(orch, KEEP_THINKING)
                yield ReasoningDelta(KEEP_THINKING)
            verdict = loop.settle(record, await decide(plan, index + 1, record.signals))
        yield RoundDone(record, verdict)
    if not closed_by_model:
        trace.add(orch, TRANSITION, [])
        yield ReasoningDelta(TRANSITION)
    closing = ("" if closed_by_model else TRANSITION) + markers.end + "\n"
    answer_prompt = prompt + trace.ids + orch.encode(closing)
    record: RoundRecord | None = None
    async for ev in _answer(orch, request_id, len(loop.rounds), answer_prompt, sampling):
        if isinstance(ev, RoundRecord):
            record = ev
        else:
            yield ev
    assert record is not None and loop.exit_reason is not None
    record.decision, record.decided_by = "answer", "router"
    summary = {
        "thinking_tokens": trace.thought,
        "segments": len(loop.rounds),
        "segment_tokens": plan.segment_tokens,
        "budget": {"min": least, "max": most},
        "closed_by": "model" if closed_by_model else loop.exit_reason.value,
        "answer_cached_tokens": record.cached_tokens,
    }
    yield Finished(
        Outcome(
            plan, [*loop.rounds, record], loop.exit_reason, record.text, "".join(trace.text), thinking=summary
        )
    )


async def _answer(
    orch: Orchestrator, request_id: str, index: int, prompt: list[int], sampling: SamplingSpec
) -> AsyncIterator[ContentDelta | RoundRecord]:
    """The answer after the closed trace, streamed as content; its record last."""
    spec = dataclasses.replace(
        sampling, max_tokens=orch.room(sampling.max_tokens, prompt), kv_tags=round_tags(sampling, index)
    )
    acc, start = Accumulator(), orch.now()
    async for delta in orch.generate(f"{request_id}-a", prompt, spec):
        acc.add(delta, (orch.now() - start) * 1000.0)
        if delta.text:
            yield ContentDelta(delta.text)
    yield orch.record(index, acc, prompt, (orch.now() - start) * 1000.0, [])
