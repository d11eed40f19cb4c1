"""Fitting a transcript to a token budget (pure), with a fake tokenizer that is countable by hand:
every message costs its whitespace-separated words + 4.

Each round adds its own words + 4, plus its verify request (V = VERIFY words + 4). The rounds below:
  R0  22 words, condensed "[round 0 condensed] Final answer: 4"   6 words: saves 16
  R1  33 words, condensed "[round 1 condensed] Final answer: 5"   6 words: saves 27
  R2  10 words, no final answer -> "[round 2 omitted]"            3 words: saves 7
  R3  42 words, the latest: always verbatim
"""

import random

import pytest

from services.reasoning.prompts import VERIFY_INSTRUCTION, Message, round_messages
from services.reasoning.pruning import Pruned, PruneError, build_messages, condense, fit_transcript

CONV = [Message("system", "be brief"), Message("user", "what is two plus two")]
R0 = "a " * 19 + "Final answer: 4"
R1 = "b " * 29 + "so\nFinal answer: **5**"
R2 = "c " * 10
R3 = "d " * 39 + "Final answer: 4"
ROUNDS = [R0, R1, R2, R3]
V = len(VERIFY_INSTRUCTION.split()) + 4


def count(messages):
    return sum(len(m.content.split()) + 4 for m in messages)


BASE = count(round_messages(CONV, []))  # system (with the draft instruction) + question
FULL = BASE + sum(w + 4 + V for w in (22, 33, 10, 42))
MINIMAL = BASE + 42 + 4 + V  # the conversation and the latest round alone


def contents(p: Pruned) -> list[str]:
    return [m.content for m in p.messages]


def test_the_hand_counts_hold():
    assert [len(r.split()) for r in ROUNDS] == [22, 33, 10, 42]
    assert count(round_messages(CONV, ROUNDS)) == FULL
    assert count(round_messages(CONV, [R3])) == MINIMAL


def test_a_transcript_that_fits_is_returned_unchanged():
    for budget in (FULL, FULL + 1000):
        p = fit_transcript(CONV, ROUNDS, budget, count)
        assert p.messages == round_messages(CONV, ROUNDS)  # same prefix: the cache still matches
        assert (p.tokens, p.kept, p.condensed, p.dropped, p.pruned) == (FULL, (0, 1, 2, 3), (), (), False)


@pytest.mark.parametrize(
    ("budget", "condensed", "tokens"),
    [
        (FULL - 1, (0,), FULL - 16),
        (FULL - 16, (0,), FULL - 16),
        (FULL - 17, (0, 1), FULL - 43),
        (FULL - 43, (0, 1), FULL - 43),
        (FULL - 44, (0, 1, 2), FULL - 50),
        (FULL - 50, (0, 1, 2), FULL - 50),
    ],
)
def test_older_rounds_are_condensed_oldest_first(budget, condensed, tokens):
    p = fit_transcript(CONV, ROUNDS, budget, count)
    assert (p.condensed, p.dropped, p.tokens, p.pruned) == (condensed, (), tokens, True)
    assert p.kept == tuple(i for i in range(4) if i not in condensed)
    assert p.tokens == count(p.messages)


def test_condensed_rounds_keep_their_answer_line_in_place():
    p = fit_transcript(CONV, ROUNDS, FULL - 44, count)
    assert contents(p)[2:] == [
        "[round 0 condensed] Final answer: 4",
        VERIFY_INSTRUCTION,
        "[round 1 condensed] Final answer: 5",
        VERIFY_INSTRUCTION,
        "[round 2 omitted]",
        VERIFY_INSTRUCTION,
        R3,
        VERIFY_INSTRUCTION,
    ]


@pytest.mark.parametrize(
    ("over", "dropped", "condensed"),
    [
        (1, (0,), (1, 2)),
        (10 + V, (0,), (1, 2)),
        (11 + V, (0, 1), (2,)),
        (20 + 2 * V, (0, 1), (2,)),
        (21 + 2 * V, (0, 1, 2), ()),
    ],
)
def test_condensed_rounds_are_then_dropped_oldest_first(over, dropped, condensed):
    # All condensed: FULL - 50. Each drop then removes a 6-, 6- and 3-word note (+4) and its verify.
    p = fit_transcript(CONV, ROUNDS, FULL - 50 - over, count)
    assert (p.dropped, p.condensed, p.kept) == (dropped, condensed, (3,))
    assert p.tokens == count(p.messages) <= FULL - 50 - over


def test_the_minimum_is_the_conversation_and_the_latest_round():
    p = fit_transcript(CONV, ROUNDS, MINIMAL, count)
    assert p.messages == round_messages(CONV, [R3]) and p.tokens == MINIMAL
    assert [m.role for m in p.messages] == ["system", "user", "assistant", "user"]
    with pytest.raises(PruneError, match=f"need {MINIMAL} tokens; the budget is {MINIMAL - 1}") as err:
        fit_transcript(CONV, ROUNDS, MINIMAL - 1, count)
    assert (err.value.needed, err.value.budget) == (MINIMAL, MINIMAL - 1)
    assert isinstance(err.value, ValueError)


def test_every_budget_keeps_the_question_system_and_latest_round_and_counts_exactly():
    prev_cut = 0
    for budget in range(FULL + 2, MINIMAL - 1, -1):  # a shrinking budget never cuts less
        p = fit_transcript(CONV, ROUNDS, budget, count)
        assert p.tokens == count(p.messages) <= budget
        c = contents(p)
        assert c[0].startswith("be brief") and c[1] == "what is two plus two"
        assert c[-2:] == [R3, VERIFY_INSTRUCTION] and 3 in p.kept
        assert [m.role for m in p.messages[1:]] == ["user", "assistant"] * (len(c) // 2 - 1) + ["user"]
        assert sorted(p.kept + p.condensed + p.dropped) == [0, 1, 2, 3]
        cut = len(p.condensed) + 2 * len(p.dropped)
        assert cut >= prev_cut
        prev_cut = cut


def test_every_step_is_recounted():
    seen = []

    def recording(messages):
        seen.append(list(messages))
        return count(messages)

    p = fit_transcript(CONV, ROUNDS, FULL - 44, recording)
    assert len(seen) == 4  # the full transcript, then one count per condensed round
    assert seen[-1] == p.messages and p.tokens == count(seen[-1])
    assert [count(m) for m in seen] == [FULL, FULL - 16, FULL - 43, FULL - 50]


def test_a_round_no_longer_than_its_note_stays_verbatim_until_dropped():
    rounds = ["ok", R1, R3]  # "[round 0 omitted]" would be 3 words instead of 1
    full = count(round_messages(CONV, rounds))
    p = fit_transcript(CONV, rounds, full - 1, count)
    assert (p.kept, p.condensed, p.dropped) == ((0, 2), (1,), ())
    assert contents(p)[2] == "ok"
    p = fit_transcript(CONV, rounds, full - 28, count)  # condensing R1 saves 27: round 0 must go
    assert (p.kept, p.condensed, p.dropped) == ((2,), (1,), (0,))


def test_without_older_rounds_nothing_can_be_pruned():
    assert fit_transcript(CONV, [], BASE, count).messages == round_messages(CONV, [])
    with pytest.raises(PruneError, match=f"need {BASE} tokens"):
        fit_transcript(CONV, [], BASE - 1, count)
    one = count(round_messages(CONV, [R0]))
    assert fit_transcript(CONV, [R0], one, count).kept == (0,)
    with pytest.raises(PruneError):
        fit_transcript(CONV, [R0], one - 1, count)


def test_a_conversation_without_system_prompt_keeps_all_its_messages():
    conv = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "what is two plus two")]
    p = fit_transcript(conv, ROUNDS, count(round_messages(conv, [R3])), count)
    assert contents(p)[1:4] == ["hi", "hello", "what is two plus two"] and p.dropped == (0, 1, 2)


@pytest.mark.parametrize(
    ("text", "note"),
    [
        ("no answer here", "[round 3 omitted]"),
        ("x\n**Final answer:** 42\nmore", "[round 3 condensed] Final answer: 42"),
        ("Final answer: 1\nwait\nfinal ANSWER: It Is 7.", "[round 3 condensed] Final answer: It Is 7."),
        ("Final answer:\n  12 apples  ", "[round 3 condensed] Final answer: 12 apples"),
        ("**Final answer: 3,000**", "[round 3 condensed] Final answer: 3,000"),
        ("Final answer: **", "[round 3 omitted]"),
        ("Final answer:", "[round 3 omitted]"),
    ],
)
def test_condense_keeps_the_final_answer_as_written(text, note):
    assert condense(3, text) == note


def test_build_messages_leaves_dropped_rounds_out_with_their_verify_request():
    msgs = build_messages(CONV, ROUNDS, condensed={1}, dropped={0, 2})
    assert msgs == round_messages(CONV, ["[round 1 condensed] Final answer: 5", R3])


def test_random_transcripts_fit_or_fail_exactly():
    rng = random.Random(7)
    for _ in range(400):
        rounds = [
            " ".join("w" for _ in range(rng.randint(0, 40)))
            + rng.choice(["", f"\nFinal answer: {rng.randint(0, 9)}"])
            for _ in range(rng.randint(0, 6))
        ]
        full = count(round_messages(CONV, rounds))
        minimal = count(round_messages(CONV, rounds[-1:]))
        budget = rng.randint(minimal - 5, full + 5)
        if budget < minimal:
            with pytest.raises(PruneError):
                fit_transcript(CONV, rounds, budget, count)
            continue
        p = fit_transcript(CONV, rounds, budget, count)
        assert p.tokens == count(p.messages) <= budget
        assert p.pruned == (budget < full) and (p.messages == round_messages(CONV, rounds)) == (not p.pruned)
        if rounds:
            assert p.messages[-2].content == rounds[-1] and len(rounds) - 1 in p.kept
