"""`ponder bench policy`'s statistics and analysis (pure): intervals, the verdict, and the replay of
each policy on recorded chains."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from bench.policy import FORMATS, analyse, outcome, policies_for, replay
from bench.policy_stats import best_fixed, paired_difference, ratio_of_means, verdict, wilson
from cluster import cli
from cluster.calibrate_routing import multiple_choice
from cluster.problems import Problem
from cluster.runner import QWEN
from services.config import DEFAULT_CONFIG
from services.reasoning.signals import Signals


def test_wilson_matches_the_textbook_value_and_stays_inside_0_1():
    ci = wilson(81, 263)  # Newcombe (1998), example: 0.3080 [0.2553, 0.3662]
    assert (round(ci.value, 4), round(ci.lo, 4), round(ci.hi, 4)) == (0.308, 0.2553, 0.3662)
    assert wilson(0, 10).lo == 0.0 and 0.0 < wilson(0, 10).hi < 0.35
    assert wilson(10, 10).hi == pytest.approx(1.0) and wilson(10, 10).lo > 0.65
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_the_paired_difference_uses_the_per_prompt_differences():
    a = [True] * 60 + [False] * 40
    b = [True] * 50 + [False] * 50  # a is right wherever b is, and on 10 more
    d = paired_difference(a, b)
    sd = math.sqrt((10 * 0.9**2 + 90 * 0.1**2) / 99)
    assert d.value == pytest.approx(0.10)
    assert d.lo == pytest.approx(0.10 - 1.959964 * sd / 10, abs=1e-6)
    assert paired_difference(b, b).as_dict() == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_the_token_ratio_interval_brackets_the_ratio_and_is_seeded():
    rng = random.Random(0)
    den = [rng.randint(80, 160) for _ in range(300)]
    num = [d // 2 + rng.randint(-5, 5) for d in den]
    r = ratio_of_means(num, den, seed=3)
    assert r.lo < r.value < r.hi and r.value == pytest.approx(sum(num) / sum(den))
    assert r.hi - r.lo < 0.05  # 300 paired prompts pin a ratio near 0.5 tightly
    assert ratio_of_means(num, den, seed=3) == r
    with pytest.raises(ValueError):
        ratio_of_means([1.0], [0.0], seed=0)


def test_best_fixed_prefers_accuracy_then_fewer_tokens():
    acc = {"fixed-1": 0.5, "fixed-2": 0.6, "fixed-4": 0.6}
    assert best_fixed(acc, {"fixed-1": 10, "fixed-2": 30, "fixed-4": 50}) == "fixed-2"


def test_the_verdict_needs_the_lower_bound_above_minus_the_margin():
    best = [True] * 150 + [False] * 150
    worse = [True] * 140 + [False] * 160  # 3.3 points worse: not non-inferior at 2 points
    tokens, ref = [40.0] * 300, [100.0] * 300
    no = verdict(worse, best, tokens, ref, margin=0.02, token_bound=0.6, seed=0)
    assert not no.non_inferior and no.within_tokens and no.token_ratio.value == pytest.approx(0.4)
    same = verdict(best, best, [70.0] * 300, ref, margin=0.02, token_bound=0.6, seed=0)
    assert same.non_inferior and not same.within_tokens


def _round(correct: bool, tokens: int, answer: str, confidence: float, stable: int) -> dict:
    s = Signals(confidence, confidence, confidence, confidence, tokens, stable, True)
    return {
        "answer": answer,
        "correct": correct,
        "completion_tokens": tokens,
        "signals": dataclasses.asdict(s),
    }


def test_replay_exits_where_the_pure_policy_does_and_outcome_reads_the_prefix():
    pols, _ = policies_for(str(DEFAULT_CONFIG), QWEN)
    sure = [_round(True, 10, "4", 0.99, k + 1) for k in range(4)]
    unsure = [_round(k == 3, 10, str(k), 0.2, 1) for k in range(4)]
    low, _ = pols.plan("What is 2 + 2?", "low")
    assert (low.min_rounds, low.max_rounds) == (1, 2)
    assert replay(sure, low) == 1  # confident after its min round
    assert replay(unsure, low) == 2  # never confident: its ceiling
    medium, _ = pols.plan("What is 2 + 2?", "medium")
    assert replay(unsure, medium) == 4 and outcome(unsure, 4) == (True, 40)
    assert outcome(unsure, 2) == (False, 20) and outcome(unsure[:3], 4) == (False, 30)


def test_analyse_pairs_formats_and_compares_with_the_best_fixed_policy():
    pols, _ = policies_for(str(DEFAULT_CONFIG), QWEN)
    traces = []
    for i in range(40):
        right_late = i % 4 == 0  # a quarter of the chains get right only at round 3
        rounds = [_round(right_late and k >= 2 or not right_late, 12, "x", 0.99, 1) for k in range(4)]
        for fmt in FORMATS:
            q = f"What is {i} + 1?" + ("\n\nOptions:\nA) 1\nB) 2" if fmt != "plain" else "")
            traces.append({"format": fmt, "question": q, "default_tier": "low", "rounds": rounds})
    res = {"seed": 0, "traces": traces}
    a = analyse(res, pols, margin=0.02, token_bound=0.6)
    assert set(a) == set(FORMATS)
    plain = a["plain"]
    assert plain["best_fixed"] == "fixed-3"  # first to reach every right answer, cheapest of equals
    assert plain["policies"]["fixed-1"]["accuracy"]["value"] == pytest.approx(0.75)
    assert plain["policies"]["default"]["accuracy"]["value"] == pytest.approx(0.75)  # exits at round 1
    v = plain["verdict"]
    assert v["difference"]["value"] == pytest.approx(-0.25) and not v["non_inferior"]
    assert v["token_ratio"]["value"] == pytest.approx(12 / 48) and v["within_tokens"]
    assert plain["default_minus"]["fixed-1"]["value"] == 0.0  # the same rounds: the same answers
    assert plain["default_minus"]["fixed-4"]["value"] == pytest.approx(-0.25)


def test_true_false_problems_get_a_multiple_choice_form():
    p = Problem("q1", "ransom_note", "x", "Can the note be built?", "True", {}, checker=lambda a, e: 1.0)
    mc = multiple_choice(p, 0)
    assert mc is not None and "A) " in mc.question and "B) " in mc.question and "C) " not in mc.question


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--problems", "1"], "--problems must be at least 2"),
        (["--margin", "0"], "--margin must be in (0, 1)"),
        (["--from", "/nonexistent/policy.json"], "no such result file"),
    ],
)
def test_bad_arguments_are_a_clear_error_before_any_engine(tmp_path, capsys, extra, message):
    assert cli.main(["bench", "policy", "--json", str(tmp_path / "p.json"), *extra]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "p.json").exists()


def test_a_file_that_is_not_a_policy_result_is_refused(tmp_path, capsys):
    other = tmp_path / "tax.json"
    other.write_text('{"bench": "tax"}')
    assert cli.main(["bench", "policy", "--json", str(tmp_path / "p.json"), "--from", str(other)]) == 1
    assert "is not a `ponder bench policy` result" in capsys.readouterr().err
