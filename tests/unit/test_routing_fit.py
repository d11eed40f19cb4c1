"""Tier routing fitted to outcomes (services/reasoning/routing_fit.py) and the scorer's model check."""

import numpy as np
import pytest

from services.reasoning.complexity import ComplexityConfig, RoutingCalibration, score
from services.reasoning.routing_fit import (
    TIERS,
    Trace,
    fit_ordinal,
    fit_routing,
    fitted_config,
    held_out_split,
    label,
)

CEILINGS = {"low": 2, "medium": 4, "high": 6}


def trace(correct, tokens=None, text="q", group="g"):
    return Trace(text, tuple(correct), tuple(tokens or [10] * len(correct)), group)


@pytest.mark.parametrize(
    ("correct", "want"),
    [
        ([True] * 6, "low"),  # right at once: the cheapest tier
        ([False] * 6, "low"),  # never right: more rounds buy nothing
        ([False, False, False, True, True, True], "medium"),  # right from round 4
        ([False] * 5 + [True], "high"),  # only the high ceiling gets it
        ([True, True, False, False, False, False], "low"),  # later rounds broke it: low was best
    ],
)
def test_a_prompt_is_labelled_with_the_cheapest_tier_that_reaches_the_best_answer(correct, want):
    assert label(trace(correct), CEILINGS) == want


def test_a_chain_of_k_rounds_is_the_first_k_rounds_of_the_trace():
    t = trace([False, True, False], tokens=[5, 7, 11])
    assert t.at(2) == (True, 12) and t.at(6) == (False, 23)  # a shorter trace: all it ran


def synthetic(n=120, seed=3):
    """Prompts whose tier is decided by their arithmetic operators alone (0: low, 1-2: medium,
    3+: high), with noise words that must get no weight."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ops = int(rng.integers(0, 5))
        words = " ".join(["word"] * int(rng.integers(1, 250)))  # long is not hard here
        text = f"{words} " + " ".join(f"{k} + {k + 1}" for k in range(ops))
        tier = "low" if ops == 0 else "medium" if ops <= 2 else "high"
        first = {"low": 1, "medium": 3, "high": 5}[tier]
        correct = [r >= first for r in range(6)]
        out.append(trace(correct, text=text, group=f"p{i}"))
    return out


def test_the_fit_recovers_a_rule_the_labels_follow_and_beats_the_hand_set_scorer():
    fit = fit_routing(synthetic(), CEILINGS, ComplexityConfig(), seed=0, held_out=0.3)
    assert fit.held_out == 36 and fit.train == 84
    assert fit.held_out_accuracy >= 0.9 > fit.hand_held_out_accuracy
    w = fit.config.weights
    assert w["arithmetic"].weight > 10 * w["words"].weight  # the operators decide, not length
    assert all(x.weight >= 0 for x in w.values())
    assert fit.config.thresholds.medium < fit.config.thresholds.high
    # the fitted scorer reads as before: every contribution is explained
    assert score("1 + 2 and 3 + 4 and 5 + 6 and 7 + 8", fit.config).tier == "high"
    assert score("just some words here", fit.config).tier == "low"
    # on held-out prompts the fitted routing is as right as always-high, for fewer tokens
    pol = fit.policies
    assert pol["fitted scorer"].accuracy == pytest.approx(pol["always high"].accuracy)
    assert pol["fitted scorer"].mean_tokens < pol["always high"].mean_tokens


def test_the_fit_is_deterministic_for_a_seed():
    a = fit_routing(synthetic(), CEILINGS, ComplexityConfig(), seed=5, held_out=0.3)
    b = fit_routing(synthetic(), CEILINGS, ComplexityConfig(), seed=5, held_out=0.3)
    assert a.config.model_dump() == b.config.model_dump() and a.policies == b.policies
    other = fit_routing(synthetic(), CEILINGS, ComplexityConfig(), seed=6, held_out=0.3)
    assert held_out_split([f"p{i}" for i in range(120)], 0.3, 5) != held_out_split(
        [f"p{i}" for i in range(120)], 0.3, 6
    )
    assert other.held_out == a.held_out


def test_formats_of_one_problem_stay_on_one_side_of_the_split():
    groups = [f"p{i // 2}" for i in range(40)]  # two prompts (plain, multiple-choice) per problem
    out = held_out_split(groups, 0.25, 1)
    assert len(out) == 5 and out <= set(groups)


def test_labels_all_low_route_everything_low():
    """When later rounds never pay (the measured case for small models), nothing is sent up."""
    flat = [trace([True] * 6, text=t, group=t) for t in ("a b", "1 + 2 + 3 + 4", "plan then compare " * 20)]
    fit = fit_routing(flat * 4, CEILINGS, ComplexityConfig(), seed=0, held_out=0.25)
    assert fit.labels == {"low": 12, "medium": 0, "high": 0}
    assert all(score(t.text, fit.config).tier == "low" for t in flat)


def test_ordinal_fit_keeps_weights_non_negative_and_thresholds_ordered():
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    y = np.array([2, 0, 1])  # the first feature would want a negative weight
    w, t1, t2 = fit_ordinal(x, y)
    assert (w >= 0).all() and t1 < t2
    cfg = fitted_config(ComplexityConfig(), np.array([0.0] * 7), 5.0, 2.0)  # crossing: kept ordered
    assert cfg.thresholds.medium < cfg.thresholds.high


def calibrated(model: str) -> ComplexityConfig:
    block = RoutingCalibration(
        model=model,
        at="2026-11-28",
        dataset=["chain_sum:easy"],
        seed=0,
        prompts=10,
        labels=dict.fromkeys(TIERS, 0) | {"low": 10},
        held_out=3,
        held_out_accuracy=1.0,
        hand_held_out_accuracy=0.3,
        majority_held_out_accuracy=1.0,
    )
    fitted = fitted_config(ComplexityConfig(), np.zeros(7), 900.0, 950.0)
    return fitted.model_copy(update={"calibration": block})


def test_a_fit_applies_to_its_own_model_only():
    cfg = calibrated("qwen2.5-coder-0.5b-instruct")
    same, warnings = cfg.for_model("qwen2.5-coder-0.5b-instruct")
    assert same is cfg and warnings == []
    other, warnings = cfg.for_model("smollm2-135m-instruct")
    assert other.calibration is None and other.weights == ComplexityConfig().weights
    assert other.thresholds == ComplexityConfig().thresholds
    assert len(warnings) == 1 and "qwen2.5-coder-0.5b-instruct" in warnings[0] and "--routing" in warnings[0]
    text = "Design a plan: first compare 3 + 4 with 5 * 6, then schedule each step."
    assert score(text, cfg).tier == "low" and score(text, other).tier != "low"
