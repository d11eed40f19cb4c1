"""Thinking mode with a scripted engine (pure logic: exact segment counts and budgets for given
logprob patterns; the close and the answer). The same loop runs on a real engine in tests/e2e."""

from __future__ import annotations

import asyncio
import math

import pytest

from services.loop.orchestrator import ContentDelta, Finished, Orchestrator, ReasoningDelta
from services.reasoning.prompts import Message
from services.reasoning.thinking import KEEP_THINKING, TRANSITION, TraceMarkers
from services.reasoning.tiers import RoundPlan
from services.worker.engine import GenerateDelta, SamplingSpec

MARKER_ID = 0xE000  # the end marker's token (never decoded here: its text is cut at the stop)
SURE = ((1, 0.0),)  # confidence 1
UNSURE = tuple((i, math.log(0.25)) for i in range(4))  # confidence 0.70 of a 100-token vocabulary


class CharTokenizer:
    """One token per character: prompts and traces can be read back exactly."""

    def render(self, messages):
        return self.encode("".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: ")

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class Thinker:
    """Segments of `max_tokens` 'x's with the logprobs `pattern[i]` of the i-th segment; `closes_at`:
    the segment in which the model writes its end marker after 3 tokens (as vLLM stops on a stop
    string: the marker's tokens are in the output's ids, not in its text). The answer is
    'Final answer: 4'."""

    def __init__(self, pattern, closes_at=None) -> None:
        self.pattern, self.closes_at, self.calls = pattern, closes_at, []

    async def generate(self, rid, prompt, spec):
        self.calls.append((rid, list(prompt), spec.max_tokens, spec.stop))
        closing = False
        if rid.endswith("-a"):
            text, top, reason = "Final answer: 4", SURE, "stop"
        else:
            i, part = (int(x) for x in rid.rsplit("-s", 1)[1].split("."))
            at = self.closes_at
            closing = part == 0 and (i == at or (isinstance(at, set) and i in at))  # told to go on, it does
            text = "x" * (3 if closing else spec.max_tokens)
            top, reason = self.pattern[min(i, len(self.pattern) - 1)], "stop" if closing else "length"
        for j, c in enumerate(text):
            last = j == len(text) - 1 and not closing
            yield GenerateDelta(c, [ord(c)], [top], finished=last, finish_reason=reason if last else None)
        if closing:  # the marker, one token here
            yield GenerateDelta("", [MARKER_ID], [top], finished=True, finish_reason="stop")


async def _continue(plan, rounds_done, signals):
    return None  # as if depth control were unreachable: the plan's own policy (local) decides


def run(engine, plan, opened=False, spec=None, generate=None, **orch_kw):
    o = Orchestrator(
        generate or engine.generate,
        _continue,
        CharTokenizer(),
        vocab_size=100,
        max_model_len=100_000,
        min_round_tokens=4,
        trace=TraceMarkers(),
        trace_opened=opened,
        **orch_kw,
    )

    async def go():
        sampling = spec or SamplingSpec(max_tokens=32)
        return [e async for e in o.run("r", [Message("user", "2+2?")], plan, sampling)]

    return asyncio.run(go())


def plan(min_rounds=1, max_rounds=3, threshold=None, budget=None, segment=8):
    return RoundPlan("t", min_rounds, max_rounds, threshold, segment_tokens=segment, thinking_budget=budget)


def segments(engine):
    return [c[2] for c in engine.calls if not c[0].endswith("-a")]


@pytest.mark.parametrize(("budget", "sizes"), [(None, [8, 8, 8]), (20, [8, 8, 4]), (5, [5])])
def test_the_thinking_budget_holds_exactly(budget, sizes):
    p = plan(budget=budget, max_rounds=3 if budget is None else -(-budget // 8))
    engine = Thinker([UNSURE])
    events = run(engine, p)
    out = events[-1].outcome
    assert segments(engine) == sizes and out.thinking["thinking_tokens"] == sum(sizes)
    assert out.thinking["closed_by"] == "ceiling" and out.exit_reason.value == "ceiling"
    assert out.content == "Final answer: 4" and out.rounds[-1].answer == "4"
    assert out.reasoning_content == "x" * sum(sizes) + TRANSITION
    assert out.total_reasoning_tokens == sum(sizes)  # the trace; the answer is the completion


def test_confidence_ends_thinking_after_the_least_thinking():
    engine = Thinker([UNSURE, SURE])  # unsure in segment 0, sure from segment 1 on
    out = run(engine, plan(min_rounds=1, max_rounds=5, threshold=0.9))[-1].outcome
    assert segments(engine) == [8, 8] and out.thinking["closed_by"] == "confidence"
    engine = Thinker([SURE])  # sure at once, but two segments are the least
    out = run(engine, plan(min_rounds=2, max_rounds=5, threshold=0.9))[-1].outcome
    assert segments(engine) == [8, 8] and [r.decision for r in out.rounds] == [
        "min_rounds",
        "confidence",
        "answer",
    ]


def test_a_trace_the_model_closes_itself_is_closed_once_without_the_transition():
    engine = Thinker([UNSURE], closes_at=1)
    out = run(engine, plan(min_rounds=1, max_rounds=5))[-1].outcome
    assert segments(engine) == [8, 8] and out.thinking["closed_by"] == "trace_closed"
    answer_prompt = CharTokenizer().decode(engine.calls[-1][1])
    assert answer_prompt.count("</think>") == 1 and answer_prompt.count("<think>") == 1
    assert answer_prompt.endswith("x" * 11 + "</think>\n") and TRANSITION not in out.reasoning_content
    assert MARKER_ID not in engine.calls[-1][1]  # the model's own close is not kept twice
    assert all(c[3] == ("</think>",) for c in engine.calls[:-1])  # segments stop at the end marker
    assert engine.calls[-1][1][: len(engine.calls[0][1])] == engine.calls[0][1]  # one growing prompt


def test_a_model_that_closes_before_the_least_thinking_is_told_to_go_on_within_its_segment():
    engine = Thinker([UNSURE], closes_at=0)
    out = run(engine, plan(min_rounds=2, max_rounds=3))[-1].outcome
    # segment 0: 3 tokens and the marker's, told to go on, the 4 tokens left; then two more segments
    assert segments(engine) == [8, 4, 8, 8] and out.thinking["segments"] == 3
    assert out.reasoning_content.startswith("xxx" + KEEP_THINKING + "xxxx" + "x" * 8)
    assert out.thinking["thinking_tokens"] == 24 == out.thinking["budget"]["max"]
    assert "</think>" not in out.reasoning_content


def test_a_template_that_opens_the_trace_is_not_opened_twice():
    engine = Thinker([UNSURE])
    run(engine, plan(max_rounds=1), opened=True)
    assert "<think>" not in CharTokenizer().decode(engine.calls[0][1])
    engine = Thinker([UNSURE])
    run(engine, plan(max_rounds=1))
    assert CharTokenizer().decode(engine.calls[0][1]).endswith("<think>\n")


def test_the_stream_is_the_trace_then_the_answer_as_the_blocking_response_says():
    events = run(Thinker([UNSURE, SURE]), plan(min_rounds=1, max_rounds=4, threshold=0.9))
    out = events[-1].outcome
    assert isinstance(events[-1], Finished)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert (reasoning, content) == (out.reasoning_content, out.content)
    kinds = [type(e) for e in events if isinstance(e, (ContentDelta, ReasoningDelta))]
    assert ReasoningDelta not in kinds[kinds.index(ContentDelta) :]


def test_the_least_thinking_holds_when_the_model_keeps_closing_its_trace():
    engine = Thinker([UNSURE], closes_at={0, 1, 2})
    out = run(engine, plan(min_rounds=2, max_rounds=3, threshold=0.5))[-1].outcome
    assert out.thinking["budget"]["min"] == 16 and out.thinking["thinking_tokens"] >= 16
    assert segments(engine)[:4] == [8, 4, 8, 4]  # each of the first two segments filled after a close
    assert out.reasoning_content.count(KEEP_THINKING) >= 2


class Prober(Thinker):
    """A Thinker whose probes answer `answers[i]` after segment i (a probe's request id ends -p<i>)."""

    def __init__(self, pattern, answers) -> None:
        super().__init__(pattern)
        self.answers = answers

    async def generate(self, rid, prompt, spec):
        if "-p" not in rid:
            async for d in super().generate(rid, prompt, spec):
                yield d
            return
        self.calls.append((rid, list(prompt), spec.max_tokens, spec.stop))
        i = int(rid.rsplit("-p", 1)[1])
        text = f" {self.answers[min(i, len(self.answers) - 1)]}"[: spec.max_tokens]
        for j, c in enumerate(text):
            last = j == len(text) - 1
            yield GenerateDelta(c, [ord(c)], [SURE], finished=last, finish_reason="stop" if last else None)


def stable_plan(min_rounds=1, max_rounds=6, probe=4, stable_for=2):
    return RoundPlan(
        "t",
        min_rounds,
        max_rounds,
        None,
        segment_tokens=8,
        exit_rule={"stable_for": stable_for},
        probe_tokens=probe,
    )


@pytest.mark.parametrize(
    ("answers", "segments_run"),
    [
        (["1", "2", "2"], 3),  # probes agree after segment 2: exit there
        (["1", "2", "3", "4", "4"], 5),
        (["3", "3"], 2),
        (["wait, 3", "3", "hmm 3", "3", "3?", "3"], 6),  # a hesitant probe is no answer: never two in a row
    ],
)
def test_probes_that_agree_end_thinking_and_never_enter_the_trace(answers, segments_run):
    engine = Prober([UNSURE], answers)
    out = run(engine, stable_plan())[-1].outcome
    assert out.thinking["segments"] == segments_run
    probes = out.thinking["probes"]
    assert [p["segment"] for p in probes] == list(range(min(segments_run, 5)))  # none after the last
    assert (
        out.reasoning_content.count("x") == 8 * segments_run and "Final answer" not in out.reasoning_content
    )
    # a stable-answers rule ends on agreeing probes, said apart from a confidence exit
    expected = "stable_answers" if segments_run < 6 else "ceiling"
    assert out.exit_reason.value == out.thinking["closed_by"] == expected
    # the answer's prompt is the trace, closed: no probe text in it
    answer_prompt = CharTokenizer().decode(engine.calls[-1][1])
    assert "I now have enough" not in answer_prompt and answer_prompt.count("</think>") == 1
    # every probe asked the trace as it was, closed, greedy, never stored
    for rid, prompt, max_tokens, _stop in engine.calls:
        if "-p" in rid:
            assert CharTokenizer().decode(prompt).endswith("</think>\nFinal answer:") and max_tokens == 4
    # probe tokens are paid for: usage counts them, the trace's tokens do not include them
    assert out.thinking["probe_tokens"] == sum(p["tokens"] for p in probes) > 0
    assert out.total_completion_tokens == 8 * segments_run + out.thinking["probe_tokens"] + 15


def test_probes_start_where_their_answers_can_first_count_and_stop_before_the_ceiling():
    engine = Prober([UNSURE], ["5"])
    out = run(engine, stable_plan(min_rounds=4, max_rounds=6))[-1].outcome
    # min 4 segments, stable_for 2: the probe after segment 2 is the first that can count
    assert [p["segment"] for p in out.thinking["probes"]] == [2, 3]
    assert out.thinking["segments"] == 4 and out.exit_reason.value == "stable_answers"
    engine = Prober([UNSURE], ["5"])
    out = run(engine, stable_plan(probe=0))[-1].outcome  # a tier without probes: none
    assert out.thinking["probes"] == [] and out.thinking["segments"] == 6


@pytest.mark.parametrize(("total", "reserve"), [(40, 10), (30, 10), (12, 6)])
def test_max_completion_tokens_is_trace_and_answer_with_room_kept_for_the_answer(total, reserve):
    engine = Thinker([UNSURE])
    spec = SamplingSpec(max_tokens=total, completion_budget=total)
    out = run(engine, plan(min_rounds=1, max_rounds=10), spec=spec, answer_reserve=10)[-1].outcome
    assert out.thinking["thinking_tokens"] == total - reserve == sum(segments(engine))
    assert engine.calls[-1][2] == reserve  # the answer may use exactly what is left
    assert out.thinking["budget"]["answer_reserve"] == reserve and out.exit_reason.value == "ceiling"


def test_segments_are_stored_as_rounds_of_the_session_and_probes_are_never_stored():
    """KV retention follows the trace: segment i is round i of the session in the store (the live
    segment and the one before stay hot, older ones go to disk first: kvstore/core.py); a probe is
    never stored, but is routed to the session's worker, whose prefix cache holds the trace."""
    engine, tags = Prober([UNSURE], ["1", "2", "3", "3"]), []
    generate = engine.generate

    async def spy(rid, prompt, spec):
        tags.append((rid, spec.kv_tags, spec.affinity))
        async for d in generate(rid, prompt, spec):
            yield d

    run(engine, stable_plan(), spec=SamplingSpec(max_tokens=32, kv_tags=("sess", 0, "")), generate=spy)
    segs = [(t, a) for rid, t, a in tags if "-s" in rid]
    assert [t for t, _ in segs] == [("sess", i, "") for i in range(4)]
    assert all(t is None and a == "sess" for rid, t, a in tags if "-p" in rid) and len(tags) == 4 + 4 + 1
    assert tags[-1][1] == ("sess", 4, "")  # the answer: the round after the last segment
