"""Tree-of-Thought through the orchestrator with a scripted fake engine: every expansion asks for a
node grant, children come from one n-sample request, the best path becomes the response's rounds."""

import asyncio
import math

from services.ingress.responses import degraded_reasons
from services.loop.orchestrator import ContentDelta, Finished, Orchestrator, ReasoningDelta, local_decide
from services.reasoning.prompts import Message
from services.reasoning.tiers import TOT_BUDGET_SPENT, RoundPlan
from services.worker.engine import GenerateDelta, GenerateResult, SamplingSpec

SURE = ((1, 0.0),)
UNSURE = tuple((i, math.log(0.25)) for i in range(4))


class WordTokenizer:
    def render(self, messages):
        return [len(w) for m in messages for w in f"{m.role}: {m.content}".split()]

    def decode(self, ids):
        return " ".join("w" * i for i in ids)

    def encode(self, text):
        return [len(w) for w in text.split()]


class FakeExpander:
    """Child i of every expansion answers str(i); child 0 is sure, the rest unsure."""

    def __init__(self):
        self.calls = []

    async def __call__(self, rid, prompt, spec, n):
        self.calls.append((rid, len(prompt), n))
        assert n == 1 or spec.temperature > 0  # vLLM refuses n > 1 with greedy sampling
        out = []
        for i in range(n):
            top = SURE if i == 0 else UNSURE
            out.append(
                GenerateResult(
                    text=f"step Final answer: {i}",
                    token_ids=[3, 3, 3],
                    logprobs=[top, top, top],
                    finish_reason="stop",
                    prompt_tokens=len(prompt),
                )
            )
        return out


async def _no_stream(*_):
    raise AssertionError("ToT must not use the streaming path")
    yield  # pragma: no cover


def run(plan, grant=None, release=None):
    expander = FakeExpander()
    orch = Orchestrator(
        _no_stream, None, WordTokenizer(), vocab_size=100, max_model_len=4096, expand=expander
    )

    async def go():
        conv = [Message("user", "what is 2 + 2")]
        return [
            e
            async for e in orch.run(
                "r", conv, plan, SamplingSpec(max_tokens=8), grant_nodes=grant, release_nodes=release
            )
        ]

    return asyncio.run(go()), expander


def test_tot_respects_node_and_depth_budgets_and_reports_the_best_path():
    plan = RoundPlan("high", 2, 3, None, strategy="tot", tot={"branching": 2, "max_total_nodes": 5})
    events, expander = run(plan)
    outcome = events[-1].outcome
    assert isinstance(events[-1], Finished)
    assert outcome.tot["nodes"] <= 5 and outcome.tot["depth"] <= 3
    assert sum(n for _, _, n in expander.calls) == outcome.tot["nodes"]
    assert len(outcome.rounds) == len(outcome.tot["best_path"])
    assert [r.index for r in outcome.rounds] == list(range(len(outcome.rounds)))
    assert outcome.all_completion_tokens == 3 * outcome.tot["nodes"]
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert text == outcome.content and outcome.content.endswith("Final answer: 0")
    assert "[tot node 1" in "".join(e.text for e in events if isinstance(e, ReasoningDelta))


def test_every_expansion_asks_for_nodes_and_releases_them():
    in_flight, peak, asked = [0], [0], []

    async def grant(wanted):
        asked.append(wanted)
        g = min(wanted, 1)  # a tight global budget: one child at a time
        in_flight[0] += g
        peak[0] = max(peak[0], in_flight[0])
        return g

    async def release(n):
        in_flight[0] -= n

    plan = RoundPlan("high", 1, 3, None, strategy="tot", tot={"branching": 3, "max_total_nodes": 4})
    events, expander = run(plan, grant, release)
    outcome = events[-1].outcome
    assert all(n == 1 for _, _, n in expander.calls) and len(asked) == len(expander.calls)
    assert peak[0] == 1 and in_flight[0] == 0
    assert outcome.tot["nodes"] <= 3  # depth 3 reached with one child per level


def test_a_denied_root_expansion_falls_back_to_a_degraded_chain():
    async def deny(wanted):
        return 0

    async def stream(rid, prompt, spec):
        yield GenerateDelta("Final answer: 4", [3], [SURE], True, "stop", len(prompt))

    expander = FakeExpander()
    orch = Orchestrator(
        stream, local_decide, WordTokenizer(), vocab_size=100, max_model_len=4096, expand=expander
    )
    plan = RoundPlan("high", 2, 3, None, strategy="tot", tot={"branching": 2, "max_total_nodes": 4})

    async def go():
        conv = [Message("user", "what is 2 + 2")]
        return [e async for e in orch.run("r", conv, plan, SamplingSpec(max_tokens=8), grant_nodes=deny)]

    outcome = asyncio.run(go())[-1].outcome
    assert expander.calls == []  # no node was generated beyond the budget
    assert outcome.plan.strategy == "cot" and outcome.plan.degraded and outcome.tot is None
    assert len(outcome.rounds) == 3 and outcome.content == "Final answer: 4"
    # ...and says so: the response and the degraded-requests metric name the spent node budget.
    assert outcome.plan.fallback == TOT_BUDGET_SPENT
    assert degraded_reasons(outcome, ["sessions 9/8"]) == ["sessions 9/8", TOT_BUDGET_SPENT]
