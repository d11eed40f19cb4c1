import math

import pytest

from services.reasoning.confidence import (
    answer_start,
    mean_confidence,
    round_confidence,
    token_confidence,
)


def lp(p: float) -> float:
    return math.log(p)


def test_certain_token_is_full_confidence():
    assert token_confidence([(7, 0.0)], vocab_size=1000) == pytest.approx(1.0)


def test_two_equal_tokens_no_tail():
    # H = log 2 over log 4
    assert token_confidence([(1, lp(0.5)), (2, lp(0.5))], vocab_size=4) == pytest.approx(0.5)


def test_tail_mass_is_spread_over_the_rest_of_the_vocabulary():
    # top-1 p=0.5; tail 0.5 over 2 tokens (0.25 each): H = .5 ln 2 + .5 ln 4 = 1.0397; / ln 3
    expected = 1 - (0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(3)
    assert token_confidence([(1, lp(0.5))], vocab_size=3) == pytest.approx(expected)
    assert expected == pytest.approx(0.05360, abs=1e-4)


def test_uniform_distribution_is_zero_confidence_even_if_only_top_k_is_known():
    assert token_confidence([(1, lp(0.25)), (2, lp(0.25))], vocab_size=4) == pytest.approx(0.0)


def test_ignoring_the_tail_would_overstate_confidence():
    top = [(1, lp(0.3)), (2, lp(0.2))]
    with_tail = token_confidence(top, vocab_size=50_000)
    no_tail_entropy = -(0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert with_tail < 1 - no_tail_entropy / math.log(50_000)


def test_sampled_token_repeated_outside_top_k_counts_once():
    once = token_confidence([(1, lp(0.5)), (2, lp(0.5))], vocab_size=4)
    twice = token_confidence([(1, lp(0.5)), (2, lp(0.5)), (2, lp(0.5))], vocab_size=4)
    assert once == twice


def test_mean_and_empty():
    assert mean_confidence([], 10) is None
    a = [(1, 0.0)]
    b = [(1, lp(0.5)), (2, lp(0.5))]
    assert mean_confidence([a, b], 4) == pytest.approx((1.0 + 0.5) / 2)


def test_invalid_vocab():
    with pytest.raises(ValueError):
        token_confidence([(1, 0.0)], vocab_size=1)


# A toy tokenizer: token i decodes to WORDS[i].
WORDS = ["We ", "add. ", "Final ", "answer: ", "42"]


def decode(ids: list[int]) -> str:
    return "".join(WORDS[i] for i in ids)


def test_answer_span_starts_at_the_last_marker():
    ids = [0, 1, 2, 3, 4]
    text = decode(ids)
    assert answer_start(text, ids, decode) == 2
    assert answer_start("no marker here", ids, decode) == 0


def test_round_confidence_uses_only_the_answer_span():
    ids = [0, 1, 2, 3, 4]
    unsure = [(1, lp(0.5)), (2, lp(0.5))]
    sure = [(1, 0.0)]
    logprobs = [unsure, unsure, sure, sure, sure]
    assert round_confidence(decode(ids), ids, logprobs, 4, decode) == pytest.approx(1.0)
    assert round_confidence("We add. ", [0, 1], logprobs[:2], 4, decode) == pytest.approx(0.5)
