import math

import pytest
from pydantic import ValidationError

from services.reasoning.confidence import mean_confidence
from services.reasoning.signals import (
    ExitRule,
    Signals,
    deepconf_token_confidence,
    extract_answer,
    group_confidences,
    lowest_group_confidence,
    mean_token_confidence,
    stable_rounds,
    tail_confidence,
    token_confidences,
)


def tok(c: float) -> list[tuple[int, float]]:
    """A k=2 token whose DeepConf confidence is exactly c: logprobs -(c - 0.5) and -(c + 0.5)."""
    return [(1, -(c - 0.5)), (2, -(c + 0.5))]


def test_token_confidence_k2():
    # -mean(-0.1, -2.3) = 1.2
    assert deepconf_token_confidence([(5, -0.1), (9, -2.3)]) == pytest.approx(1.2)
    # a flatter distribution is less confident: -mean(ln .5, ln .5) = ln 2 < 1.2
    assert deepconf_token_confidence([(5, math.log(0.5)), (9, math.log(0.5))]) == pytest.approx(math.log(2))


def test_duplicate_sampled_token_is_counted_once():
    # the sampled token 5 repeats a top-k entry: entries {5: -0.1, 9: -2.3}, not three
    assert deepconf_token_confidence([(5, -0.1), (9, -2.3), (5, -0.1)]) == pytest.approx(1.2)


def test_empty_token_is_an_error():
    with pytest.raises(ValueError):
        deepconf_token_confidence([])


CONFS = [1.0, 3.0, 2.0, 4.0, 0.5]


def test_sliding_groups_on_five_tokens_window_three():
    # windows: (1+3+2)/3 = 2.0, (3+2+4)/3 = 3.0, (2+4+0.5)/3 = 6.5/3 = 2.1667; lowest = 2.0
    assert group_confidences(CONFS, 3) == pytest.approx([2.0, 3.0, 6.5 / 3])
    assert lowest_group_confidence(CONFS, 3) == pytest.approx(2.0)


def test_fewer_tokens_than_window_is_one_group():
    assert group_confidences([1.0, 2.0], 3) == pytest.approx([1.5])
    assert group_confidences(CONFS, 5) == pytest.approx([2.1])
    assert group_confidences([], 3) == []
    assert lowest_group_confidence([], 3) is None
    with pytest.raises(ValueError):
        group_confidences(CONFS, 0)


def test_tail_and_mean():
    assert tail_confidence(CONFS, 2) == pytest.approx(2.25)  # (4 + 0.5) / 2
    assert tail_confidence(CONFS, 50) == pytest.approx(2.1)  # all: 10.5 / 5
    assert tail_confidence([], 2) is None
    assert mean_token_confidence(CONFS) == pytest.approx(2.1)
    assert mean_token_confidence([]) is None


def test_signals_compute_once_per_round():
    logprobs = [tok(c) for c in CONFS]
    assert token_confidences(logprobs) == pytest.approx(CONFS)
    s = Signals.compute(logprobs, vocab_size=100, window=3, tail=2)
    assert s.n_tokens == 5
    assert s.entropy_confidence == pytest.approx(mean_confidence(logprobs, 100))
    assert s.mean_token_confidence == pytest.approx(2.1)
    assert s.lowest_group_confidence == pytest.approx(2.0)
    assert s.tail_confidence == pytest.approx(2.25)


def test_signals_of_an_empty_round():
    assert Signals.compute([], vocab_size=100) == Signals(None, None, None, None, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final Answer: 42.", "42"),
        ("final answer: 1,000", "1000"),
        ("FINAL ANSWER: 42.0", "42"),
        ("Final answer: 3.50 kg", "3.5 kg"),
        ("Final answer: 7\nFinal answer: 8", "8"),  # the last marker wins
        ("Final answer: Paris\nbecause it is the capital.", "paris"),  # first line only
        ("Final answer:\n  The   Blue  Whale.  ", "the blue whale"),  # answer on the next line
        ("**Final answer:** 12", "12"),
        ("Final answer: 1,2,3", "1,2,3"),  # not a grouped number: left alone
        ("The answer is 42.", None),
        ("Final answer:   ", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["a", "b", "b"], 2),
        (["a", "b", None], 0),
        (["b", "b", "b"], 3),
        (["b", None, "b"], 1),
        (["a"], 1),
        ([], 0),
        ([None, None], 0),
    ],
)
def test_stable_rounds(answers, expected):
    assert stable_rounds(answers) == expected


SIG = Signals(
    entropy_confidence=0.9,
    mean_token_confidence=2.0,
    lowest_group_confidence=1.0,
    tail_confidence=3.0,
    n_tokens=10,
)


def test_rule_all_needs_every_criterion():
    rule = ExitRule(min_entropy_confidence=0.85, min_lowest_group_confidence=1.5, stable_for=2)
    ok, why = rule.satisfied(SIG, stable_rounds=2)
    assert not ok
    assert why == [
        "entropy_confidence 0.900 >= 0.85",
        "lowest_group_confidence 1.000 < 1.5",
        "stable_rounds 2 >= 2",
    ]
    relaxed = ExitRule(min_entropy_confidence=0.85, min_lowest_group_confidence=0.5, stable_for=2)
    assert relaxed.satisfied(SIG, stable_rounds=3)[0] is True


def test_rule_any_needs_one_criterion():
    rule = ExitRule(min_tail_confidence=2.5, stable_for=3, mode="any")
    assert rule.satisfied(SIG, stable_rounds=1) == (
        True,
        ["tail_confidence 3.000 >= 2.5", "stable_rounds 1 < 3"],
    )
    strict = ExitRule(min_tail_confidence=3.5, stable_for=3, mode="any")
    assert strict.satisfied(SIG, stable_rounds=1)[0] is False


def test_empty_rule_never_holds():
    assert ExitRule().satisfied(SIG, stable_rounds=5) == (False, [])
    assert ExitRule(mode="any").satisfied(SIG, stable_rounds=5) == (False, [])


def test_missing_signal_fails_its_criterion():
    empty = Signals(None, None, None, None, 0)
    assert ExitRule(min_tail_confidence=0.1).satisfied(empty, 0) == (False, ["tail_confidence n/a < 0.1"])


def test_rule_validation():
    with pytest.raises(ValidationError):
        ExitRule(stable_for=1)
    with pytest.raises(ValidationError):
        ExitRule(min_entropy_confidence=1.5)
    with pytest.raises(ValidationError):
        ExitRule(mode="majority")
    with pytest.raises(ValidationError):
        ExitRule.model_validate({"min_confidence": 0.8})
