"""The reasoning loop on a real vLLM engine (no Ray): the orchestrator, the tokenizer and the tier
policy exactly as the router runs them, with depth control decided by the same pure policy."""

from __future__ import annotations

import pytest

from services.loop.orchestrator import ContentDelta, Finished, Orchestrator, ReasoningDelta
from services.loop.tokenizer import HfTokenizer
from services.reasoning.prompts import Message, round_messages
from services.reasoning.signals import extract_answer
from services.reasoning.tiers import RoundPlan, TierTable, decide, make_plan
from services.worker.engine import SamplingSpec

pytestmark = pytest.mark.engine

QUESTIONS = ["What is 17 + 25?", "Name the capital of France.", "Is 91 a prime number?"]


@pytest.fixture(scope="module")
def orchestrator(loop, engine, model_dir):
    async def depth_control(plan, rounds_done, confidence):
        return decide(plan, rounds_done, confidence)

    info = loop.run(engine.start())  # idempotent: the running engine's info
    return Orchestrator(
        engine.generate_stream,
        depth_control,
        HfTokenizer(str(model_dir)),
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
    )


def run(loop, orchestrator, plan: RoundPlan, question: str, max_tokens: int = 16):
    async def go():
        spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, top_logprobs=5)
        return [e async for e in orchestrator.run("t", [Message("user", question)], plan, spec)]

    return loop.run(go())


@pytest.fixture(scope="module")
def tiers():
    from services.config import REPO_ROOT

    return TierTable.load(REPO_ROOT / "configs" / "tiers.yaml")


@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_low_never_exceeds_two_rounds(loop, orchestrator, tiers, question):
    for threshold in (None, 0.0, 1.0):
        plan = make_plan(tiers, "low", confidence_threshold=threshold)
        outcome = run(loop, orchestrator, plan, question, max_tokens=8)[-1].outcome
        assert 1 <= len(outcome.rounds) <= 2
        if threshold == 1.0:  # never confident: the ceiling
            assert len(outcome.rounds) == 2
        if threshold == 0.0:  # confident as soon as a round states an answer (never without one)
            assert len(outcome.rounds) == (1 if outcome.rounds[0].answer is not None else 2)


def test_min_rounds_hold_under_maximal_confidence(loop, orchestrator, tiers):
    plan = make_plan(tiers, "medium", confidence_threshold=0.0)
    outcome = run(loop, orchestrator, plan, QUESTIONS[0])[-1].outcome
    # exits at min_rounds if that round states an answer (a round without one is never confident)
    answered = outcome.rounds[2].answer is not None
    assert plan.min_rounds == 3 and len(outcome.rounds) == (3 if answered else 4)
    assert all(r.confidence is not None and 0.0 < r.confidence <= 1.0 for r in outcome.rounds)


def test_max_rounds_hold_under_low_confidence(loop, orchestrator, tiers):
    plan = make_plan(tiers, "high", strategy="cot", confidence_threshold=1.0)
    outcome = run(loop, orchestrator, plan, QUESTIONS[0], max_tokens=8)[-1].outcome
    assert len(outcome.rounds) == plan.max_rounds == 6
    assert outcome.exit_reason.value == "ceiling"


def test_later_rounds_reuse_the_prefix_cache(loop, orchestrator, tiers):
    plan = make_plan(tiers, "medium", max_rounds=3, min_rounds=3)
    outcome = run(loop, orchestrator, plan, "Explain why the sky is blue, in detail." * 20, 12)[-1].outcome
    # every later round re-sends the transcript; the engine's prefix cache serves most of it
    assert all(r.cached_tokens > 0 for r in outcome.rounds[1:])


def test_a_round_cut_before_its_answer_is_closed_from_the_prefix_cache(loop, engine, model_dir, tiers):
    """A rambling round is cut at its cap less the closing's reserve; the router writes "Final
    answer:" and the model completes the line from the cached round (no re-prefill), within the cap."""
    closings = []

    def generate(rid, prompt, spec):
        async def deltas():
            async for d in engine.generate_stream(rid, prompt, spec):
                if rid.endswith("-close"):
                    closings.append((len(prompt), spec, d))
                yield d

        return deltas()

    info = loop.run(engine.start())
    orch = Orchestrator(
        generate,
        lambda plan, n, s: _local(plan, n, s),
        HfTokenizer(str(model_dir)),
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
    )
    plan = make_plan(tiers, "low", confidence_threshold=1.0)
    question = "Explain why the sky is blue, in detail. " * 20  # several cache blocks long
    outcome = run(loop, orch, plan, question, max_tokens=64)[-1].outcome
    assert len(outcome.rounds) == 2 and closings  # never confident: both rounds, at least one closed
    prompt_len, spec, _ = closings[0]
    assert spec.kv_tags is None and spec.stop == ("\n",) and spec.max_tokens <= 16
    cached = max(d.cached_tokens for n, _, d in closings if n == prompt_len)
    assert cached >= (prompt_len - 16) // engine.block_size * engine.block_size > 0  # full blocks
    for r in outcome.rounds:
        assert r.completion_tokens <= 64
        if r.finish_reason == "stop" and "\nFinal answer:" in r.text:
            tail = r.text.rsplit("\nFinal answer:", 1)[1]
            assert "\n" not in tail and r.answer == extract_answer("Final answer:" + tail)


async def _local(plan, rounds_done, signals):
    return decide(plan, rounds_done, signals)


def test_stream_order_and_text(loop, orchestrator, tiers):
    plan = make_plan(tiers, "medium")
    events = run(loop, orchestrator, plan, QUESTIONS[0])
    kinds = [type(e) for e in events if isinstance(e, ReasoningDelta | ContentDelta)]
    assert kinds[0] is ReasoningDelta and kinds[-1] is ContentDelta
    assert ReasoningDelta not in kinds[kinds.index(ContentDelta) :]
    outcome = events[-1].outcome
    assert isinstance(events[-1], Finished)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == outcome.content


def test_tot_on_the_real_engine_keeps_budgets_under_concurrency(loop, engine, model_dir, tiers):
    """Several ToT requests share one node budget (the depth-control policy, in process): no request
    exceeds its node or depth budget and the shared cap is never exceeded."""
    import asyncio

    from services.loop.orchestrator import local_decide
    from services.reasoning.budgets import BudgetConfig, Budgets

    budgets = Budgets(BudgetConfig(max_tot_nodes_in_flight=2))
    peak = [0]
    info = loop.run(engine.start())
    orch = Orchestrator(
        engine.generate_stream,
        local_decide,
        HfTokenizer(str(model_dir)),
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        expand=engine.generate_n,
    )
    plan = make_plan(tiers, "high", max_rounds=3, min_rounds=2, tot={"branching": 2, "max_total_nodes": 4})

    async def one(i: int):
        sid = f"tot-{i}"
        budgets.admit(sid, api_key="k", tier="high", min_rounds=2, max_rounds=3, now=0)

        async def grant(wanted: int) -> int:
            while (g := budgets.grant_nodes(sid, wanted, now=0)) == 0:
                await asyncio.sleep(0.01)  # polling the shared budget, as DepthClient does
            peak[0] = max(peak[0], budgets.nodes_in_flight)
            return g

        async def release(n: int) -> None:
            budgets.release_nodes(sid, n, now=0)

        spec = SamplingSpec(max_tokens=8, temperature=0.8, seed=i, top_logprobs=5)
        conv = [Message("user", QUESTIONS[i % len(QUESTIONS)])]
        events = [e async for e in orch.run(sid, conv, plan, spec, grant_nodes=grant, release_nodes=release)]
        return events[-1].outcome

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(3)))

    outcomes = loop.run(all_of_them())
    assert 1 <= peak[0] <= 2 and budgets.nodes_in_flight == 0
    for o in outcomes:
        assert o.plan.strategy == "tot" and 1 <= o.tot["nodes"] <= 4 and o.tot["depth"] <= 3
        assert len(o.rounds) == len(o.tot["best_path"]) and o.content == o.rounds[-1].text
        assert o.all_completion_tokens >= sum(r.completion_tokens for r in o.rounds)


def test_context_pruning_with_the_real_tokenizer(model_dir):
    from services.reasoning.pruning import fit_transcript

    tok = HfTokenizer(str(model_dir))
    conv = [Message("user", QUESTIONS[0])]
    rounds = [("Let me think. " * 30) + f"Final answer: {40 + i}" for i in range(3)]
    full = len(tok.render(round_messages(conv, rounds)))
    for budget in (full, full - 50, full - 150):
        p = fit_transcript(conv, rounds, budget, lambda m: len(tok.render(m)))
        rendered = tok.render(p.messages)
        assert p.tokens == len(rendered) <= budget  # exact, from the chat template
        assert rounds[-1] in tok.decode(rendered)  # the latest round stays verbatim
        assert QUESTIONS[0] in tok.decode(rendered)
    assert not fit_transcript(conv, rounds, full, lambda m: len(tok.render(m))).pruned
