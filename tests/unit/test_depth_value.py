"""Depth value learned online (services/reasoning/depth_value.py): pure, seeded."""

from __future__ import annotations

import random

import pytest

from services.reasoning.depth_value import DepthValue, DepthValueConfig

CFG = DepthValueConfig(window=100, min_samples=20, max_change_rate=0.05, explore=0.1)


def feed(dv, n, rates, seed=0, domain="math", tier="medium"):
    """n chain requests of len(rates) + 1 rounds; round k+1 changes the answer with probability rates[k]."""
    rng = random.Random(seed)
    for _ in range(n):
        dv.observe(domain, tier, [rng.random() < r for r in rates])


def test_rounds_that_never_change_answers_bring_the_ceiling_down_to_the_floor():
    dv = DepthValue(CFG)
    assert dv.ceiling("math", "medium", 1, 4)[0] == 4  # nothing seen yet
    feed(dv, 19, [0, 0, 0])
    assert dv.ceiling("math", "medium", 1, 4) == (4, "round 4: 19 of 20 requests seen")
    feed(dv, 1, [0, 0, 0])
    eff, why = dv.ceiling("math", "medium", 1, 4)
    assert eff == 1 and why.startswith("round 2 changed 0.0% of answers over 20 requests")
    assert dv.ceiling("math", "medium", 3, 4)[0] == 3  # never below the floor
    assert dv.ceiling("math", "low", 1, 2)[0] == 2 and dv.ceiling("code", "medium", 1, 4)[0] == 4  # per key


def test_only_the_rounds_that_do_not_pay_are_dropped_from_the_top():
    dv = DepthValue(CFG)
    feed(dv, 100, [0.3, 0.0, 0.0])  # round 2 changes answers, rounds 3 and 4 do not
    assert dv.ceiling("math", "medium", 1, 4)[0] == 2
    dv = DepthValue(CFG)
    feed(dv, 100, [0.0, 0.3, 0.0])  # round 3 pays: rounds below it stay, whatever they do
    assert dv.ceiling("math", "medium", 1, 4)[0] == 3


def test_when_rounds_change_answers_again_the_ceiling_comes_back():
    dv = DepthValue(CFG)
    feed(dv, 100, [0, 0, 0])
    assert dv.ceiling("math", "medium", 1, 4)[0] == 1
    feed(dv, 30, [0.5, 0.5, 0.5], seed=1)  # explored requests find changes again
    assert dv.ceiling("math", "medium", 1, 4)[0] == 4


@pytest.mark.parametrize("share", [0.0, 0.05, 0.5])
def test_exploration_is_a_reproducible_share_of_sessions(share):
    dv = DepthValue(CFG.model_copy(update={"explore": share}))
    picks = [dv.explores(f"chatcmpl-{i}") for i in range(4000)]
    assert picks == [dv.explores(f"chatcmpl-{i}") for i in range(4000)]
    assert abs(sum(picks) / len(picks) - share) < 0.02


def test_state_round_trips_as_json_and_damage_costs_only_statistics():
    import json

    dv = DepthValue(CFG)
    feed(dv, 50, [0.2, 0.0])
    back = DepthValue.restore(CFG, json.loads(json.dumps(dv.snapshot())))
    assert back.summary() == dv.summary() and back.ceiling("math", "medium", 1, 3) == dv.ceiling(
        "math", "medium", 1, 3
    )
    assert DepthValue.restore(CFG, {"x|y": "nope", 3: [], "a|b": [None, "01x1"]}).rate("a", "b", 2) == (
        3,
        2 / 3,
    )
    off = DepthValue(CFG.model_copy(update={"enabled": False}))
    feed(off, 100, [0, 0, 0])
    assert off.ceiling("math", "medium", 1, 4) == (4, "off")
