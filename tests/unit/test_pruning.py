"""Fitting a transcript to a token budget (pure), with a hand-countable fake tokenizer."""

import pytest

from services.reasoning.prompts import Message, round_messages
from services.reasoning.pruning import PruneError, condense, fit_transcript

CONV = [Message("system", "be brief"), Message("user", "what is two plus two")]
ROUNDS = ["a " * 20 + "Final answer: 4", "b " * 20 + "Final answer: 5", "c " * 20 + "Final answer: 4"]


def count(messages):
    return sum(len(m.content.split()) + 4 for m in messages)  # words + 4 per message


def test_fits_unchanged():
    full = round_messages(CONV, ROUNDS)
    p = fit_transcript(CONV, ROUNDS, count(full), count)
    assert p.messages == full and not p.pruned and p.kept == (0, 1, 2)


def test_condenses_oldest_first_then_drops():
    full = count(round_messages(CONV, ROUNDS))
    p = fit_transcript(CONV, ROUNDS, full - 1, count)  # condensing round 0 saves 20 - 4 words
    assert (p.condensed, p.dropped, p.kept) == ((0,), (), (1, 2))
    assert p.tokens == count(p.messages) <= full - 1
    assert "[round 0 condensed] Final answer: 4" in [m.content for m in p.messages]
    both = fit_transcript(CONV, ROUNDS, full - 20, count)
    assert both.condensed == (0, 1)
    dropped = fit_transcript(CONV, ROUNDS, both.tokens - 1, count)
    assert dropped.dropped == (0,) and dropped.condensed == (1,)
    contents = [m.content for m in dropped.messages]
    assert contents[-2] == ROUNDS[2]  # the latest round is always verbatim
    assert contents[1] == "what is two plus two" and "be brief" in contents[0]


def test_roles_keep_alternating_after_drops():
    minimal = fit_transcript(CONV, ROUNDS, count(round_messages(CONV, ROUNDS[-1:])), count)
    assert minimal.dropped == (0, 1)
    roles = [m.role for m in minimal.messages]
    assert roles == ["system", "user", "assistant", "user"]


def test_too_small_a_budget_is_an_error():
    with pytest.raises(PruneError, match="budget is 10"):
        fit_transcript(CONV, ROUNDS, 10, count)


def test_condense_without_a_final_answer():
    assert condense(3, "no answer here") == "[round 3 omitted]"
    assert condense(0, "x\n**Final answer:** 42\nmore") == "[round 0 condensed] Final answer: 42"
