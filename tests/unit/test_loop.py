"""The round loop and the orchestrator, with a scripted fake engine (pure logic only; the real
engine runs the same code in tests/engine and tests/e2e)."""

import asyncio
import math

import pytest

from services.loop.orchestrator import (
    ContentDelta,
    ContextLengthError,
    Finished,
    Orchestrator,
    ReasoningDelta,
    RoundDone,
)
from services.reasoning.loop import RoundLoop, RoundRecord, StreamRole, round_role
from services.reasoning.prompts import Message, RoundPrompts
from services.reasoning.thinking import TraceMarkers
from services.reasoning.tiers import Action, DecidedBy, Reason, RoundPlan, Verdict
from services.worker.engine import GenerateDelta, SamplingSpec

SURE = ((1, 0.0),)
UNSURE = tuple((i, math.log(0.25)) for i in range(4))  # confidence 1 - ln4/ln100 = 0.70


class WordTokenizer:
    """One token per whitespace-separated word of the rendered transcript."""

    def render(self, messages):
        return [len(w) for m in messages for w in f"{m.role}: {m.content}".split()]

    def decode(self, ids):
        return " ".join("w" * i for i in ids)

    def encode(self, text):
        return [len(w) for w in text.split()]


class FakeEngine:
    """Rounds of `words` words; with `answer`, the last word is "Final answer: <answer>"."""

    def __init__(self, top=SURE, words=3, answer=None):
        self.top, self.words, self.answer, self.calls = top, words, answer, []

    async def generate(self, rid, prompt, spec):
        self.calls.append((rid, len(prompt), spec.max_tokens))
        n = min(self.words, spec.max_tokens)
        for i in range(n):
            last = self.answer is not None and i == n - 1
            yield GenerateDelta(
                f"Final answer: {self.answer}" if last else f"w{i} ",
                [3],
                [self.top],
                finished=i == n - 1,
                finish_reason="stop" if i == n - 1 else None,
                prompt_tokens=len(prompt),
            )


def remote(action=None):
    async def decide(plan, rounds_done, conf):
        return (
            None
            if action is None
            else Verdict(
                action,
                Reason.CONFIDENCE if action is Action.EXIT else Reason.BELOW_THRESHOLD,
                by=DecidedBy.ACTOR,
            )
        )

    return decide


def run(orch, plan, conversation=None):
    conv = conversation or [Message("user", "what is 2 + 2")]

    async def go():
        return [e async for e in orch.run("r", conv, plan, SamplingSpec(max_tokens=8))]

    return asyncio.run(go())


def orch(engine, decide, max_len=4096):
    return Orchestrator(
        engine.generate,
        decide,
        WordTokenizer(),
        vocab_size=100,
        max_model_len=max_len,
        min_round_tokens=4,
    )


def test_round_roles_for_medium():
    plan = RoundPlan("medium", 3, 4, 0.82)
    assert [round_role(plan, i) for i in range(4)] == [
        StreamRole.REASONING,
        StreamRole.REASONING,
        StreamRole.UNDECIDED,
        StreamRole.FINAL,
    ]
    assert round_role(RoundPlan("x", 1, 3, None), 1) is StreamRole.REASONING


def test_min_rounds_hold_even_if_depth_control_says_exit():
    events = run(orch(FakeEngine(SURE), remote(Action.EXIT)), RoundPlan("medium", 3, 4, 0.82))
    outcome = events[-1].outcome
    assert len(outcome.rounds) == 3
    assert outcome.exit_reason is Reason.CONFIDENCE
    # the plan's guard overrode the actor's exit twice (the router decided), then the actor's verdict
    assert [r.decided_by for r in outcome.rounds] == ["router", "router", "depth_control"]


def test_ceiling_holds_even_if_depth_control_says_continue():
    events = run(orch(FakeEngine(UNSURE), remote(Action.CONTINUE)), RoundPlan("high", 1, 5, 0.9))
    outcome = events[-1].outcome
    assert len(outcome.rounds) == 5 and outcome.exit_reason is Reason.CEILING


def test_a_confident_round_without_a_final_answer_is_not_confident():
    """'17 + 25 is indeed 27.' at confidence 0.95 and no answer line: the loop goes on to its ceiling."""
    events = run(orch(FakeEngine(SURE), remote(None)), RoundPlan("low", 1, 2, 0.82))
    out = events[-1].outcome
    assert len(out.rounds) == 2 and out.exit_reason is Reason.CEILING and out.rounds[0].confidence == 1.0
    assert out.rounds[0].decision == "below_threshold" and out.rounds[0].detail == ("no final answer",)


def test_unreachable_depth_control_decides_locally():
    events = run(orch(FakeEngine(SURE, answer="4"), remote(None)), RoundPlan("low", 1, 2, 0.82))
    outcome = events[-1].outcome
    assert len(outcome.rounds) == 1 and outcome.exit_reason is Reason.CONFIDENCE
    assert outcome.rounds[0].decided_by == "local"


def test_stream_events_match_the_final_outcome():
    events = run(orch(FakeEngine(UNSURE), remote(None)), RoundPlan("medium", 3, 4, 0.82))
    kinds = [type(e) for e in events if not isinstance(e, RoundDone)]
    first_content = kinds.index(ContentDelta)
    assert ReasoningDelta not in kinds[first_content:]  # all reasoning precedes all content
    outcome = events[-1].outcome
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == outcome.reasoning_content
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == outcome.content
    assert outcome.reasoning_tokens == 9 and outcome.completion_tokens == 12
    assert isinstance(events[-1], Finished)


def test_each_round_extends_the_previous_prompt():
    engine = FakeEngine(UNSURE)
    run(orch(engine, remote(None)), RoundPlan("medium", 3, 4, 0.82))
    lengths = [n for _, n, _ in engine.calls]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4


def test_context_limit_stops_the_loop_cleanly():
    engine = FakeEngine(UNSURE, words=8)
    o = orch(engine, remote(None), max_len=40)
    events = run(o, RoundPlan("high", 1, 6, 0.99))
    outcome = events[-1].outcome
    assert outcome.exit_reason is Reason.CONTEXT
    assert 1 <= len(outcome.rounds) < 6
    assert all(n + m <= 40 for _, n, m in engine.calls)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == outcome.content


def test_first_prompt_too_long_is_refused():
    o = orch(FakeEngine(), remote(None), max_len=10)
    with pytest.raises(ContextLengthError, match="maximum context length is 10"):
        run(o, RoundPlan("low", 1, 2, 0.8), [Message("user", "word " * 50)])


def test_loop_rejects_rounds_after_the_end():
    loop = RoundLoop(RoundPlan("low", 1, 1, None))
    rec = RoundRecord(0, "x", 1, 1, 0, 1.0, 1.0, 1.0)
    assert loop.settle(rec, None).reason is Reason.CEILING
    with pytest.raises(RuntimeError):
        loop.settle(rec, None)


class CutEngine(FakeEngine):
    """Every round runs out of tokens: the engine says `length`."""

    async def generate(self, rid, prompt, spec):
        async for d in super().generate(rid, prompt, spec):
            if d.finished:
                d.finish_reason = "length"
            yield d


def test_a_round_cut_at_max_tokens_reports_length_up_to_the_response():
    from services.ingress.responses import Meta, complete, sse

    events = run(orch(CutEngine(), remote()), RoundPlan("low", 1, 2, None))
    (outcome,) = [e.outcome for e in events if isinstance(e, Finished)]
    assert [r.finish_reason for r in outcome.rounds] == ["length"] * len(outcome.rounds)
    assert outcome.finish_reason == "length" and outcome.rounds[-1].summary()["finish_reason"] == "length"
    body = asyncio.run(complete(_aiter(events), Meta("id", "m", 0)))
    assert body["choices"][0]["finish_reason"] == "length"

    async def chunks():
        return [c async for c in sse(_aiter(events), Meta("id", "m", 0), False)]

    assert '"finish_reason": "length"' in "".join(asyncio.run(chunks()))
    plain = run(orch(FakeEngine(), remote()), RoundPlan("low", 1, 1, None))
    (done,) = [e.outcome for e in plain if isinstance(e, Finished)]
    assert done.finish_reason == "stop"


async def _aiter(items):
    for x in items:
        yield x


class ThinkingEngine:
    """A model that thinks natively: each round's text arrives in these pieces (markers split)."""

    PIECES = ("<thi", "nk>2 + 2 is ", "4, sure</th", "ink>\nFinal answer: ", "4")

    async def generate(self, rid, prompt, spec):
        for i, piece in enumerate(self.PIECES):
            last = i == len(self.PIECES) - 1
            yield GenerateDelta(piece, [3], [SURE], finished=last, finish_reason="stop" if last else None)


@pytest.mark.parametrize(
    "plan", [RoundPlan("low", 1, 1, None, mode="rounds"), RoundPlan("medium", 1, 2, 0.5, mode="rounds")]
)
def test_a_native_thinking_trace_is_reasoning_and_the_stream_matches_the_answer(plan):
    """FINAL (one round: streamed live, split as it streams) and UNDECIDED (held, split at the end)."""
    o = Orchestrator(
        ThinkingEngine().generate,
        remote(None),
        WordTokenizer(),
        vocab_size=100,
        max_model_len=4096,
        min_round_tokens=4,
        trace=TraceMarkers(),
    )
    events = run(o, plan)
    outcome = events[-1].outcome
    assert len(outcome.rounds) == 1
    assert outcome.content == "\nFinal answer: 4" and outcome.rounds[0].answer == "4"
    assert outcome.reasoning_content == "2 + 2 is 4, sure"
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == outcome.content
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == outcome.reasoning_content
    kinds = [type(e) for e in events if isinstance(e, (ContentDelta, ReasoningDelta))]
    assert ReasoningDelta not in kinds[kinds.index(ContentDelta) :]  # the trace, then the answer


def test_without_trace_markers_the_markers_are_just_text():
    o = orch(ThinkingEngine(), remote(None))
    outcome = run(o, RoundPlan("low", 1, 1, None))[-1].outcome
    assert outcome.content.startswith("<think>") and outcome.reasoning_content == ""


class RamblingEngine:
    """Rounds that never state an answer and run to their cap ("length"); a closing request (its id
    ends in -close) completes the answer line with " 4", sure of it."""

    def __init__(self):
        self.calls = []

    async def generate(self, rid, prompt, spec):
        self.calls.append((rid, len(prompt), spec))
        if rid.endswith("-close"):
            yield GenerateDelta(" 4", [1], [SURE], finished=True, finish_reason="stop")
            return
        for i in range(spec.max_tokens):
            last = i == spec.max_tokens - 1
            yield GenerateDelta("ab ", [2], [UNSURE], finished=last, finish_reason="length" if last else None)


def _run_capped(o, plan, cap, ignore_eos=False):
    async def go():
        conv = [Message("user", "what is 2 + 2")]
        spec = SamplingSpec(max_tokens=cap, kv_tags=("s", 0, ""), ignore_eos=ignore_eos)
        return [e async for e in o.run("r", conv, plan, spec)]

    return asyncio.run(go())


@pytest.mark.parametrize("plan", [RoundPlan("low", 1, 2, 0.82), RoundPlan("one", 1, 1, None)])
def test_a_round_cut_before_its_answer_is_closed_within_its_cap(plan):
    """The round gets its cap less the closing's reserve; cut there with no answer line, the router
    writes "Final answer:" and the model completes the line: an answer, read with the model's own
    confidence (the router's tokens left out), so the low tier exits after one round."""
    engine = RamblingEngine()
    events = _run_capped(orch(engine, remote(None)), plan, 40)
    out = events[-1].outcome
    (r,) = out.rounds
    forced = len(["Final", "answer:"])  # the closing's tokens for this word tokenizer
    assert [c[0] for c in engine.calls] == ["r-r0", "r-r0-close"]
    assert engine.calls[0][2].max_tokens == 40 - forced - 16
    close = engine.calls[1][2]
    assert close.kv_tags is None and close.affinity == "s" and close.stop == ("\n",)
    assert close.temperature == 0.0 and close.max_tokens == 16
    assert (
        engine.calls[1][1] == engine.calls[0][1] + (40 - forced - 16) + forced
    )  # round, then "Final answer:"
    assert r.text.endswith("ab \nFinal answer: 4") and r.text.count("Final answer:") == 1
    assert (
        r.closed
        and r.summary()["closed"]
        and r.answer == "4"
        and r.confidence == 1.0
        and r.completion_tokens == 40 - 16 + 1 <= 40
    )
    assert r.finish_reason == "stop" and out.exit_reason in (Reason.CONFIDENCE, Reason.CEILING)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == out.content
    assert r.prompt_tokens == engine.calls[0][1]  # the round's own prompt, not the closing's


def test_a_round_is_not_closed_when_it_answered_closing_is_off_the_cap_is_small_or_it_must_fill_it():
    answered = FakeEngine(UNSURE, words=40, answer="4")
    out = _run_capped(orch(answered, remote(None)), RoundPlan("one", 1, 1, None), 40)[-1].outcome
    assert [c[0] for c in answered.calls] == ["r-r0"] and out.rounds[0].answer == "4"
    for prompts, cap, fill in (
        (RoundPrompts(close_tokens=0), 40, False),
        (RoundPrompts(), 20, False),
        (RoundPrompts(), 40, True),
    ):
        engine = RamblingEngine()
        o = orch(engine, remote(None))
        o.prompts = prompts
        out = _run_capped(o, RoundPlan("one", 1, 1, None), cap, ignore_eos=fill)[-1].outcome
        assert [c[0] for c in engine.calls] == ["r-r0"] and engine.calls[0][2].max_tokens == cap
        assert out.rounds[0].answer is None and out.rounds[0].finish_reason == "length"
        assert not out.rounds[0].closed
