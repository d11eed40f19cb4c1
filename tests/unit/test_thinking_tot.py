"""Tree-of-Thought over thinking segments with a scripted engine (pure logic: node budgets, shared
trace prefixes, finished nodes, probes, the close and the answer)."""

from __future__ import annotations

import asyncio
import math

from services.loop.orchestrator import ContentDelta, Orchestrator, ReasoningDelta
from services.reasoning.prompts import Message
from services.reasoning.thinking import TRANSITION, TraceMarkers
from services.reasoning.tiers import RoundPlan
from services.worker.engine import GenerateDelta, GenerateResult, SamplingSpec

SURE, UNSURE = ((1, 0.0),), tuple((i, math.log(0.25)) for i in range(4))


class Tok:
    def render(self, messages):
        return self.encode("".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: ")

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class Forest:
    """Expansions: child k of every request writes `letters[k]` x max_tokens (sure when k == sure);
    `closes`: request ids whose child 0 closes its trace after 2 tokens. Probes answer `answers`."""

    def __init__(self, letters="ab", sure=0, closes=(), answers=None) -> None:
        self.letters, self.sure, self.closes, self.answers = letters, sure, set(closes), answers or {}
        self.expansions, self.generations = [], []

    async def expand(self, rid, prompt, spec, n):
        self.expansions.append((rid, list(prompt), spec.max_tokens, n, spec.temperature))
        out = []
        for k in range(n):
            shut = k == 0 and rid in self.closes
            text = self.letters[k] * (2 if shut else spec.max_tokens)
            top = SURE if k == self.sure else UNSURE
            ids = [ord(c) for c in text] + ([0xE000] if shut else [])
            out.append(GenerateResult(text, ids, [top] * len(ids), "stop" if shut else "length", len(prompt)))
        return out

    async def generate(self, rid, prompt, spec):
        self.generations.append((rid, list(prompt), spec.max_tokens))
        if "-p" in rid:
            text = " " + self.answers.get(int(rid.rsplit("-p", 1)[1]), "?")
        else:
            text = "Final answer: 4"[: spec.max_tokens]
        for j, c in enumerate(text):
            last = j == len(text) - 1
            yield GenerateDelta(c, [ord(c)], [SURE], finished=last, finish_reason="stop" if last else None)


async def _local(plan, done, signals):
    return None


def run(engine, plan, grants=None, spec=None):
    o = Orchestrator(
        engine.generate,
        _local,
        Tok(),
        vocab_size=100,
        max_model_len=100_000,
        min_round_tokens=4,
        expand=engine.expand,
        trace=TraceMarkers(),
    )
    asked = []

    async def grant(wanted):
        asked.append(wanted)
        return wanted if grants is None else grants.pop(0)

    async def release(n):
        return None

    async def go():
        s = spec or SamplingSpec(max_tokens=16, temperature=0.0)
        return [
            e
            async for e in o.run(
                "r", [Message("user", "2+2?")], plan, s, grant_nodes=grant, release_nodes=release
            )
        ]

    return asyncio.run(go()), asked


def tree_plan(min_rounds=1, max_rounds=3, nodes=6, threshold=None, probe=0, budget=None):
    tot = {"branching": 2, "max_total_nodes": nodes, "strategy": "best_first"}
    return RoundPlan(
        "high",
        min_rounds,
        max_rounds,
        threshold,
        strategy="tot",
        tot=tot,
        segment_tokens=8,
        probe_tokens=probe,
        thinking_budget=budget,
    )


def test_a_tree_of_segments_spends_its_node_budget_and_answers_from_the_best_trace():
    engine = Forest(sure=0)  # child "a" is always the confident one
    events, asked = run(engine, tree_plan(nodes=6))
    out = events[-1].outcome
    assert out.tot["nodes"] == 6 and asked == [2, 2, 2] and [e[3] for e in engine.expansions] == [2, 2, 2]
    # best first: always the confident "a" child, so the best path is a, a, a (depth 3)
    assert out.thinking["segments"] == 3 and out.thinking["thinking_tokens"] == 24
    assert out.thinking["all_thinking_tokens"] == 48 and out.thinking["closed_by"] == "node_budget"
    # every expansion's prompt is its parent's prompt plus the parent's segment: one shared prefix
    p0, p1, p2 = (e[1] for e in engine.expansions)
    assert p1 == p0 + [ord("a")] * 8 and p2 == p1 + [ord("a")] * 8
    assert all(e[4] > 0 for e in engine.expansions)  # greedy siblings would be equal: sampled
    answer_prompt = Tok().decode(engine.generations[-1][1])
    assert answer_prompt.endswith("<think>\n" + "a" * 24 + TRANSITION + "</think>\n")
    assert out.content == "Final answer: 4" and out.rounds[-1].decision == "answer"
    assert out.total_completion_tokens == 48 + 15
    text = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert (
        text == out.reasoning_content
        and "".join(e.text for e in events if isinstance(e, ContentDelta)) == out.content
    )


def test_a_segment_whose_model_closed_its_trace_is_finished_not_expanded():
    engine = Forest(sure=0, closes={"r-n1"})  # node 1 ("a", depth 1) expands into a closing child
    out = run(engine, tree_plan(nodes=6))[0][-1].outcome
    closed = 3  # node 1's first child
    assert all(not rid.endswith(f"-n{closed}") for rid, *_ in engine.expansions)
    # as sure as the others and deepest-oldest among them: the closed trace answers, as its model closed it
    assert out.tot["best_path"] == [1, closed] and out.thinking["closed_by"] == "trace_closed"
    assert (
        TRANSITION not in out.reasoning_content and out.thinking["thinking_tokens"] == 8 + 3
    )  # 2 + the marker token
    answer_prompt = Tok().decode(engine.generations[-1][1])
    assert answer_prompt.endswith("a" * 10 + "</think>\n") and answer_prompt.count("</think>") == 1


def test_no_nodes_granted_thinks_as_a_degraded_chain_and_a_later_refusal_ends_the_search():
    engine = Forest()
    out = run(engine, tree_plan(), grants=[0])[0][-1].outcome
    assert out.plan.degraded and out.plan.strategy == "cot" and out.tot is None and not engine.expansions
    assert engine.generations[0][0] == "r-s0.0" and out.thinking["segments"] >= 1  # thought as a chain
    engine = Forest()
    out = run(engine, tree_plan(nodes=6), grants=[2, 0])[0][-1].outcome
    assert out.tot["nodes"] == 2 and out.tot["stop_reason"] == "budget_denied"


def test_probes_answer_every_open_segment_and_agreement_picks_the_path():
    # node 1 ("a", sure) answers 5; node 2 ("b") answers 4; then "a"-children 3 and 4 answer 4, 4
    engine = Forest(sure=0, answers={1: "5", 2: "4", 3: "4", 4: "4"})
    out = run(engine, tree_plan(nodes=4, max_rounds=2, probe=3))[0][-1].outcome
    probes = out.thinking["probes"]
    assert [p["node"] for p in probes] == [1, 2, 3, 4] and all(p["tokens"] == 2 for p in probes)
    assert out.thinking["probe_tokens"] == 8 and out.total_completion_tokens == 32 + 8 + 15
    assert out.tot["best_path"] == [1, 3]  # sure, and 4 is the answer most nodes agree on
    assert "Final answer" not in out.reasoning_content


def test_the_thinking_budget_bounds_every_path():
    engine = Forest()
    out = run(engine, tree_plan(nodes=6, budget=12, max_rounds=2))[0][-1].outcome
    assert [e[2] for e in engine.expansions][:2] == [8, 4]  # the second segment of a path: 4 tokens left
    assert out.thinking["thinking_tokens"] <= 12
