"""The reasoning loop on a real vLLM engine (no Ray): the orchestrator, the tokenizer and the tier
policy exactly as the router runs them, with depth control decided by the same pure policy."""

from __future__ import annotations

import pytest

from services.engine import SamplingSpec
from services.orchestrator import ContentDelta, Finished, Orchestrator, ReasoningDelta
from services.reasoning.prompts import Message
from services.reasoning.tiers import RoundPlan, TierTable, decide, make_plan
from services.tokenizer import HfTokenizer

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
        if threshold is not None:  # always / never confident: exactly min_rounds / the ceiling
            assert len(outcome.rounds) == (1 if threshold == 0.0 else 2)


def test_min_rounds_hold_under_maximal_confidence(loop, orchestrator, tiers):
    plan = make_plan(tiers, "medium", confidence_threshold=0.0)
    outcome = run(loop, orchestrator, plan, QUESTIONS[0])[-1].outcome
    assert len(outcome.rounds) == plan.min_rounds == 3
    assert all(r.confidence is not None and 0.0 < r.confidence <= 1.0 for r in outcome.rounds)


def test_max_rounds_hold_under_low_confidence(loop, orchestrator, tiers):
    plan = make_plan(tiers, "high", confidence_threshold=1.0)
    outcome = run(loop, orchestrator, plan, QUESTIONS[0], max_tokens=8)[-1].outcome
    assert len(outcome.rounds) == plan.max_rounds == 6
    assert outcome.exit_reason.value == "ceiling"


def test_later_rounds_reuse_the_prefix_cache(loop, orchestrator, tiers):
    plan = make_plan(tiers, "medium", max_rounds=3, min_rounds=3)
    outcome = run(loop, orchestrator, plan, "Explain why the sky is blue, in detail." * 20, 12)[-1].outcome
    # every later round re-sends the transcript; the engine's prefix cache serves most of it
    assert all(r.cached_tokens > 0 for r in outcome.rounds[1:])


def test_stream_order_and_text(loop, orchestrator, tiers):
    plan = make_plan(tiers, "medium")
    events = run(loop, orchestrator, plan, QUESTIONS[0])
    kinds = [type(e) for e in events if isinstance(e, ReasoningDelta | ContentDelta)]
    assert kinds[0] is ReasoningDelta and kinds[-1] is ContentDelta
    assert ReasoningDelta not in kinds[kinds.index(ContentDelta) :]
    outcome = events[-1].outcome
    assert isinstance(events[-1], Finished)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == outcome.content
