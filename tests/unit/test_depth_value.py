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


def judged_run(dv, n, right_share, seed=2):
    """n medium requests whose round 4 (only) changes the answer; feedback says right_share were right."""
    rng = random.Random(seed)
    for i in range(n):
        dv.observe("math", "medium", [False, False, True], request_id=f"r{i}")
        assert dv.judge(f"r{i}", rng.random() < right_share)


def test_changes_that_feedback_judges_wrong_do_not_pay():
    """Round 4 changes every answer; feedback says those changes end wrong: it comes down anyway."""
    dv = DepthValue(CFG)
    judged_run(dv, 30, right_share=0.0)
    eff, why = dv.ceiling("math", "medium", 3, 4)  # medium's floor is 3
    assert eff == 3 and why.startswith("round 4 changed 0.0% of answers") and "judged wrong" in why, why
    row = dv.summary()["math|medium"]["round_4"]
    assert row["changed"] == 30 and (row["changes_judged"], row["changes_right"]) == (30, 0)


def test_changes_that_feedback_judges_right_keep_the_ceiling():
    dv = DepthValue(CFG)
    judged_run(dv, 30, right_share=0.6)
    assert dv.ceiling("math", "medium", 3, 4)[0] == 4


def test_too_little_feedback_does_not_weigh_in_and_unknown_requests_teach_nothing():
    dv = DepthValue(CFG)
    for i in range(30):
        dv.observe("math", "medium", [False, False, True], request_id=f"r{i}")
    for i in range(CFG.min_judged - 1):
        dv.judge(f"r{i}", False)
    assert dv.ceiling("math", "medium", 3, 4)[0] == 4  # 9 judged: the change rate alone decides
    assert not dv.judge("never-seen", False) and not dv.judge("r0", True)  # once per request
    dv.observe("math", "medium", [False, False, False], request_id="calm")  # changed nothing
    assert not dv.judge("calm", False)


def test_only_the_most_recent_requests_await_feedback():
    dv = DepthValue(CFG.model_copy(update={"awaiting": 3}))
    for i in range(5):
        dv.observe("math", "medium", [True], request_id=f"r{i}")
    assert not dv.judge("r0", True) and not dv.judge("r1", True) and dv.judge("r4", True)


def test_judged_counts_persist_and_the_old_state_format_still_loads():
    import json

    dv = DepthValue(CFG)
    judged_run(dv, 12, right_share=0.0)
    back = DepthValue.restore(CFG, json.loads(json.dumps(dv.snapshot())))
    assert back.summary() == dv.summary() and back.ceiling("math", "medium", 3, 4)[0] == 4  # 12 < 20 seen
    old = {"math|medium": ["0" * 25, "0" * 25, "1" * 25]}  # version 1: the seen bits alone
    v1 = DepthValue.restore(CFG, old)
    assert v1.summary()["math|medium"]["round_4"]["changed"] == 25 and v1.judged == {}
