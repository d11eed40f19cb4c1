"""Tree-of-Thought over a thinking trace: the pure search (`services.reasoning.tot.TotSearch`) where a
node is one segment of the trace. Expanding a node samples b next segments from the same trace prefix
in ONE engine request (n=b: the prefix is prefilled once, or found in the prefix cache), after depth
control granted the nodes. With the tier's `probe_tokens`, every new segment is probed for the answer
its trace would give now (the answers' agreement scores the nodes, as self-consistency). A segment
whose model closed its trace is a finished node. The best node's path is the trace that is closed and
answered, as in the chain (services/loop/thinking_run.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.loop.events import (
    DecideFn,
    Event,
    Finished,
    GrantFn,
    Outcome,
    ReasoningDelta,
    ReleaseFn,
)
from services.loop.thinking_run import answer_after, answer_reserve, probe, run_thinking, trace_prompt
from services.loop.tot_run import EXIT, GREEDY_TOT_TEMPERATURE, node_header, tot_config
from services.reasoning.loop import RoundRecord
from services.reasoning.thinking import TRANSITION, max_thinking_tokens
from services.reasoning.tiers import TOT_BUDGET_SPENT, Reason, RoundPlan
from services.reasoning.tot import ChildResult, StopReason, TotSearch
from services.worker.engine import Accumulator, GenerateResult, SamplingSpec, round_tags

if TYPE_CHECKING:
    from services.loop.orchestrator import Orchestrator


@dataclass
class _Tree:
    search: TotSearch
    records: dict[int, RoundRecord] = field(default_factory=dict)
    ids: dict[int, list[int]] = field(default_factory=lambda: {0: []})  # each node's segment tokens
    probes: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0  # every expansion's and probe's
    log: list[str] = field(default_factory=list)

    def trace_ids(self, node_id: int) -> list[int]:
        return [t for i in self.search.path(node_id) for t in self.ids[i]]

    def path_tokens(self, node_id: int) -> int:
        return sum(self.records[i].completion_tokens for i in self.search.path(node_id))

    @property
    def spent(self) -> int:
        return sum(r.completion_tokens for r in self.records.values()) + sum(p["tokens"] for p in self.probes)


async def run_thinking_tot(
    orch: Orchestrator,
    request_id: str,
    plan: RoundPlan,
    sampling: SamplingSpec,
    first_prompt: list[int],
    grant: GrantFn,
    release: ReleaseFn,
    decide: DecideFn,
) -> AsyncIterator[Event]:
    assert orch.trace is not None
    base = trace_prompt(orch, first_prompt)
    tree, most = _Tree(TotSearch(tot_config(plan))), max_thinking_tokens(plan)
    total = sampling.completion_budget
    reserve = answer_reserve(orch, sampling)
    context_stop = False
    while (node := tree.search.next_expansion()) is not None:
        prompt = base + tree.trace_ids(node.id)
        wanted = tree.search.wanted(node)
        granted = min(wanted, await grant(wanted)) if wanted else 0
        if granted == 0 and node.id == 0:
            # Not one node could be had (the cluster's ToT budget is spent): think as a chain.
            chain = dataclasses.replace(
                plan, strategy="cot", tot=None, degraded=True, fallback=TOT_BUDGET_SPENT
            )
            async for ev in run_thinking(orch, request_id, chain, sampling, first_prompt, decide):
                yield ev
            return
        if granted == 0:
            tree.search.add_children(node.id, [], 0)
            continue
        # The path's thinking budget; under max_completion_tokens, every child's share of what is left.
        room = most - (tree.path_tokens(node.id) if node.id else 0)
        if total is not None:
            room = min(room, (total - reserve - tree.spent) // granted)
        n = min(plan.segment_tokens, room, orch.spare(prompt))
        if n <= 0:
            await release(granted)
            context_stop = orch.spare(prompt) <= 0
            break
        async for ev in _expand(orch, request_id, plan, sampling, tree, node.id, prompt, n, granted, release):
            yield ev
    async for ev in _close_and_answer(
        orch, request_id, plan, sampling, tree, base, context_stop, most, reserve
    ):
        yield ev


async def _close_and_answer(
    orch: Orchestrator,
    request_id: str,
    plan: RoundPlan,
    sampling: SamplingSpec,
    tree: _Tree,
    base: list[int],
    context_stop: bool,
    most: int,
    reserve: int,
) -> AsyncIterator[Event]:
    """The best node's trace, closed (by its model, or with the transition), then the answer."""
    best = tree.search.best()
    if not best.final:
        tree.log.append(TRANSITION)
        yield ReasoningDelta(TRANSITION)
    answer: RoundRecord | None = None
    path = [tree.records[i] for i in tree.search.path(best.id)]
    traced = base + tree.trace_ids(best.id)
    async for ev in answer_after(orch, request_id, len(path), traced, best.final, sampling, tree.spent):
        if isinstance(ev, RoundRecord):
            answer = ev
        else:
            yield ev
    assert answer is not None
    yield Finished(_outcome(plan, tree, path, answer, context_stop, best.final, most, reserve))


async def _expand(
    orch: Orchestrator,
    request_id: str,
    plan: RoundPlan,
    sampling: SamplingSpec,
    tree: _Tree,
    node_id: int,
    prompt: list[int],
    n: int,
    granted: int,
    release: ReleaseFn,
) -> AsyncIterator[Event]:
    """One expansion: `granted` next segments of the node's trace in one engine request, probed."""
    assert orch.trace is not None
    depth = tree.search.nodes[node_id].depth
    header = f"[tot: expanding node {node_id} at depth {depth} into {granted}]\n"
    tree.log.append(header)
    yield ReasoningDelta(header)
    spec = dataclasses.replace(
        sampling,
        max_tokens=n,
        stop=(orch.trace.end,),
        kv_tags=round_tags(sampling, depth, f"n{node_id}"),
    )
    if granted > 1 and spec.temperature == 0.0:
        spec = dataclasses.replace(spec, temperature=GREEDY_TOT_TEMPERATURE)  # siblings must differ
    try:
        results = await orch.expand(f"{request_id}-n{node_id}", prompt, spec, granted)
    finally:
        await release(granted)
    tree.prompt_tokens += results[0].prompt_tokens if results else 0
    earlier = [tree.records[i] for i in tree.search.path(node_id)]
    children = [
        orch.record(depth, Accumulator.of(r), prompt, r.latency_ms, earlier, answers=False) for r in results
    ]
    closed = [r.finish_reason == "stop" for r in results]
    ids = [
        orch.encode(c.text) if shut else list(r.token_ids)
        for c, r, shut in zip(children, results, closed, strict=True)
    ]
    if plan.probe_tokens > 0:
        await _probe_all(orch, request_id, tree, prompt, children, ids, closed, plan.probe_tokens, sampling)
    first = tree.search.add_children(
        node_id, [_child(c, r) for c, r in zip(children, results, strict=True)], granted
    )
    for k, rec in enumerate(children):
        tree.records[first + k], tree.ids[first + k] = rec, ids[k]
        if closed[k]:
            tree.search.finish(first + k)  # its model closed the trace: it answers as it is
        text = node_header(first + k, depth + 1, rec) + rec.text + "\n\n"
        tree.log.append(text)
        yield ReasoningDelta(text)


async def _probe_all(
    orch: Orchestrator,
    request_id: str,
    tree: _Tree,
    prompt: list[int],
    children: list[RoundRecord],
    ids: list[list[int]],
    closed: list[bool],
    tokens: int,
    sampling: SamplingSpec,
) -> None:
    """Probe the new segments that left their trace open, one after the other: two streamed
    worker calls of one HTTP request in flight at once were seen to stall under Serve (the second
    reached the worker ~10 s late, or never; cause not found, see docs/reasoning-control.md)."""
    first = len(tree.search.nodes)
    todo = [k for k in range(len(children)) if not closed[k]]
    found = [await probe(orch, f"{request_id}-p{first + k}", prompt + ids[k], tokens, sampling) for k in todo]
    for k, (answer, used, prompt_tokens) in zip(todo, found, strict=True):
        children[k].answer = answer
        tree.probes.append(
            {"segment": children[k].index, "node": first + k, "answer": answer, "tokens": used}
        )
        tree.prompt_tokens += prompt_tokens


def _child(rec: RoundRecord, r: GenerateResult) -> ChildResult:
    return ChildResult(rec.text, rec.confidence, rec.answer, rec.completion_tokens, r.prompt_tokens)


def _outcome(
    plan: RoundPlan,
    tree: _Tree,
    path: list[RoundRecord],
    answer: RoundRecord,
    context_stop: bool,
    closed_by_model: bool,
    most: int,
    reserve: int,
) -> Outcome:
    summary = tree.search.summary()
    stop = summary["stop_reason"]
    reason = Reason.CONTEXT if context_stop or stop is None else EXIT[StopReason(stop)]
    for index, r in enumerate(path):
        r.index, r.decided_by, r.decision = index, "tot", "continue"
    if path:
        path[-1].decision = reason.value
    rounds = [*path, answer]
    probe_tokens = sum(p["tokens"] for p in tree.probes)
    thinking = {
        "thinking_tokens": sum(r.completion_tokens for r in path),  # the trace that was answered
        "all_thinking_tokens": sum(r.completion_tokens for r in tree.records.values()),
        "segments": len(path),
        "segment_tokens": plan.segment_tokens,
        "budget": {
            "min": min(plan.min_rounds * plan.segment_tokens, most),
            "max": most,
            "answer_reserve": reserve,
        },
        "closed_by": Reason.TRACE_CLOSED.value if closed_by_model else reason.value,
        "answer_cached_tokens": answer.cached_tokens,
        "probes": tree.probes,
        "probe_tokens": probe_tokens,
    }
    return Outcome(
        plan,
        rounds,
        reason,
        answer.text,
        "".join(tree.log),
        tot=summary,
        all_prompt_tokens=tree.prompt_tokens + answer.prompt_tokens,
        all_completion_tokens=tree.spent + answer.completion_tokens,
        thinking=thinking,
    )
