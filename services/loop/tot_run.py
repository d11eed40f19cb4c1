"""Tree-of-Thought over the engine: the pure search (`services.reasoning.tot.TotSearch`) driven with
real expansions. Each expansion samples b children of one node in ONE engine request (n=b: the path's
prompt is prefilled once and shared), after depth control granted the nodes. A path of the tree is a
chain of rounds (draft, verify, ...), so the best path is reported as the response's rounds."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from services.loop.events import (
    ContentDelta,
    DecideFn,
    Event,
    Finished,
    GrantFn,
    Outcome,
    ReasoningDelta,
    ReleaseFn,
)
from services.reasoning.loop import RoundRecord
from services.reasoning.prompts import Message
from services.reasoning.tiers import TOT_BUDGET_SPENT, Reason, RoundPlan
from services.reasoning.tot import ChildResult, StopReason, TotConfig, TotSearch
from services.worker.engine import Accumulator, GenerateResult, SamplingSpec, round_tags

if TYPE_CHECKING:
    from services.loop.orchestrator import Orchestrator  # passed in: no import of the loop at run time

GREEDY_TOT_TEMPERATURE = 0.7

EXIT = {
    StopReason.CONFIDENT: Reason.CONFIDENCE,
    StopReason.MAX_DEPTH: Reason.CEILING,
    StopReason.FRONTIER_EMPTY: Reason.CEILING,
    StopReason.MAX_TOTAL_NODES: Reason.NODE_BUDGET,
    StopReason.BUDGET_DENIED: Reason.NODE_BUDGET,
}


def tot_config(plan: RoundPlan) -> TotConfig:
    """The plan's ToT settings; depth is bounded by the round ceiling, min_depth by min_rounds."""
    raw = dict(plan.tot or {})
    max_depth = min(plan.max_rounds, int(raw.pop("max_depth", plan.max_rounds)))
    raw.update(
        max_depth=max_depth,
        min_depth=min(plan.min_rounds, max_depth),
        exit_confidence=plan.confidence_threshold,
    )
    return TotConfig.model_validate(raw)


async def grant_all(wanted: int) -> int:
    return wanted


async def release_none(_: int) -> None:
    return None


def node_header(node_id: int, depth: int, r: RoundRecord) -> str:
    conf = "n/a" if r.confidence is None else f"{r.confidence:.3f}"
    return f"[tot node {node_id}: depth {depth}, confidence {conf}, answer {r.answer or '-'}]\n"


async def run_tot(
    orch: Orchestrator,
    request_id: str,
    conversation: Sequence[Message],
    plan: RoundPlan,
    sampling: SamplingSpec,
    first_prompt: list[int],
    grant: GrantFn | None,
    release: ReleaseFn | None,
    decide: DecideFn | None = None,
) -> AsyncIterator[Event]:
    grant, release = grant or grant_all, release or release_none
    search = TotSearch(tot_config(plan))
    records: dict[int, RoundRecord] = {}
    log: list[str] = []
    prompt_tokens = 0
    context_stop = False
    while (node := search.next_expansion()) is not None:
        path = search.path_texts(node.id)
        prompt = first_prompt if not path else orch.render(conversation, path)
        if not orch.fits(prompt):
            context_stop = True  # this branch cannot grow; the best node so far answers
            break
        wanted = search.wanted(node)
        granted = min(wanted, await grant(wanted)) if wanted else 0
        if granted == 0 and node.id == 0:
            # Not one node could be had (the cluster's ToT budget is spent): answer with a plain
            # chain of rounds instead of failing, and say so.
            chain = dataclasses.replace(
                plan, strategy="cot", tot=None, degraded=True, fallback=TOT_BUDGET_SPENT
            )
            async for ev in orch.run(request_id, conversation, chain, sampling, first_prompt, decide=decide):
                yield ev
            return
        if granted == 0:
            search.add_children(node.id, [], 0)
            continue
        header = f"[tot: expanding node {node.id} at depth {node.depth} into {granted}]\n"
        log.append(header)
        yield ReasoningDelta(header)
        spec = dataclasses.replace(
            sampling,
            max_tokens=orch.room(sampling.max_tokens, prompt),
            kv_tags=round_tags(sampling, node.depth, f"n{node.id}"),
        )
        if granted > 1 and spec.temperature == 0.0:
            # Siblings must differ: a greedy request explores with sampling (seeded when it is).
            spec = dataclasses.replace(spec, temperature=GREEDY_TOT_TEMPERATURE)
        try:
            results = await orch.expand(f"{request_id}-n{node.id}", prompt, spec, granted)
        finally:
            await release(granted)
        prompt_tokens += results[0].prompt_tokens if results else 0
        earlier = [records[i] for i in search.path(node.id)]
        children = [orch.record(node.depth, _round_of(r), prompt, r.latency_ms, earlier) for r in results]
        first_id = search.add_children(
            node.id, [_child(c, r) for c, r in zip(children, results, strict=True)], granted
        )
        for offset, rec in enumerate(children):
            records[first_id + offset] = rec
            text = node_header(first_id + offset, node.depth + 1, rec) + rec.text + "\n\n"
            log.append(text)
            yield ReasoningDelta(text)
    best = search.best()
    yield ContentDelta(best.text)
    yield Finished(_outcome(plan, search, records, "".join(log), prompt_tokens, context_stop))


def _outcome(
    plan: RoundPlan,
    search: TotSearch,
    records: dict[int, RoundRecord],
    log: str,
    prompt_tokens: int,
    context_stop: bool,
) -> Outcome:
    """The search's result as the loop's outcome: the best path is the chain of rounds."""
    rounds = [records[i] for i in search.best_path()]
    summary = search.summary()
    reason = Reason.CONTEXT if context_stop else EXIT[StopReason(summary["stop_reason"])]
    for index, r in enumerate(rounds):
        r.index, r.decided_by, r.decision = index, "tot", "continue"
    if rounds:
        rounds[-1].decision = reason.value
    best = search.best()
    return Outcome(
        plan,
        rounds,
        reason,
        best.text,
        log,
        tot=summary,
        all_prompt_tokens=prompt_tokens,
        all_completion_tokens=sum(r.completion_tokens for r in records.values()),
    )


def _round_of(r: GenerateResult) -> Accumulator:
    return Accumulator.of(r)


def _child(rec: RoundRecord, r: GenerateResult) -> ChildResult:
    return ChildResult(
        text=rec.text,
        confidence=rec.confidence,
        answer=rec.answer,
        completion_tokens=rec.completion_tokens,
        prompt_tokens=r.prompt_tokens,
    )
