"""Context pruning counted with SmolLM2's real tokenizer and chat template (no engine is started)."""

from __future__ import annotations

import pytest

from services.loop.tokenizer import HfTokenizer
from services.reasoning.prompts import Message, round_messages
from services.reasoning.pruning import PruneError, build_messages, fit_transcript

pytestmark = pytest.mark.engine

QUESTION = "A train leaves at 9:40 and arrives at 11:05. How many minutes is the trip?"
CONV = [Message("system", "You are a careful assistant."), Message("user", QUESTION)]
ROUNDS = [
    "The trip runs from 9:40 to 11:05. " * 12 + "Final answer: 85",
    "Checking: 9:40 to 10:40 is 60 minutes, then 25 more. " * 10 + "**Final answer:** 85 minutes",
    "Let me recount the minutes once more without writing an answer line. " * 8,
    "Verified again: 60 + 25 = 85. Final answer: 85",
]


@pytest.fixture(scope="module")
def tok(model_dir) -> HfTokenizer:
    return HfTokenizer(str(model_dir))


def count_with(tok):
    return lambda messages: len(tok.render(messages))


def test_counts_are_exact_and_within_budget(tok):
    count = count_with(tok)
    full = count(round_messages(CONV, ROUNDS))
    minimal = count(round_messages(CONV, ROUNDS[-1:]))
    assert minimal < full - 200  # the older rounds are worth pruning
    seen = set()
    middle = (full + minimal) // 2
    for budget in (full + 1, full, full - 1, full - 300, middle, minimal + 60, minimal + 5, minimal):
        p = fit_transcript(CONV, ROUNDS, budget, count)
        rendered = tok.render(p.messages)
        assert p.tokens == len(rendered) <= budget
        text = tok.decode(rendered)
        assert ROUNDS[-1] in text and QUESTION in text and "careful assistant" in text
        assert p.pruned == (budget < full) and 3 in p.kept
        seen.add((p.condensed, p.dropped))
    assert len(seen) >= 4  # unchanged, condensed, and dropped transcripts all came up
    with pytest.raises(PruneError, match=f"need {minimal} tokens; the budget is {minimal - 1}"):
        fit_transcript(CONV, ROUNDS, minimal - 1, count)


@pytest.mark.parametrize(
    ("condensed", "dropped"),
    [((0,), ()), ((0, 1), ()), ((0, 1, 2), ()), ((1, 2), (0,)), ((2,), (0, 1)), ((), (0, 1, 2))],
)
def test_each_pruning_step_at_its_exact_budget(tok, condensed, dropped):
    # A budget of exactly this step's size: every earlier step is larger (each one cuts tokens), so
    # the search must stop at this step, neither before nor after it.
    count = count_with(tok)
    budget = count(build_messages(CONV, ROUNDS, set(condensed), set(dropped)))
    p = fit_transcript(CONV, ROUNDS, budget, count)
    assert (p.condensed, p.dropped, p.tokens) == (condensed, dropped, budget)
    text = tok.decode(tok.render(p.messages))
    for i in condensed:
        assert f"[round {i} " in text
    if 0 in condensed:
        assert "[round 0 condensed] Final answer: 85" in text
    if 1 in condensed:
        assert "[round 1 condensed] Final answer: 85 minutes" in text
    if 2 in condensed:
        assert "[round 2 omitted]" in text
