"""Per-domain thresholds: registry, detection, calibration and online updates, worked by hand."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.reasoning.domains import (
    HEADER,
    CalibrationResult,
    DomainRegistry,
    TraceRound,
    calibrate,
    detect_domain,
    exit_round,
    online_threshold,
    percentile,
    save_calibration,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "domains.yaml"


def tr(*rounds: tuple[float | None, bool]) -> list[TraceRound]:
    return [TraceRound(c, ok, 10) for c, ok in rounds]


# Four problems run to a 3-round ceiling, 10 tokens a round. At the ceiling A, B, C are right and D
# is wrong: accuracy 0.75, 30 tokens each.
A = tr((0.9, True), (0.95, True), (0.97, True))
B = tr((0.6, False), (0.8, True), (0.9, True))
C = tr((0.5, False), (0.7, False), (0.85, True))
D = tr((0.95, False), (0.6, False), (0.7, False))
TRACES = [A, B, C, D]
# Confidences sorted: .5 .6 .6 .7 .7 .8 .85 .9 .9 .95 .95 .97 -> p0 = .5, p50 = (.8 + .85) / 2 = .825,
# p100 = .97.
PCTS = (0, 50, 100)


def test_percentile_interpolates_like_numpy():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([3.0, 1.0], 0) == 1.0 and percentile([3.0, 1.0], 100) == 3.0


def test_exit_round_respects_min_rounds_and_ceiling():
    assert exit_round(D, 0.9, 1, 3) == 1  # round 1's 0.95 reaches 0.9
    assert exit_round(D, 0.9, 2, 3) == 3  # round 1 may not exit; nothing later reaches 0.9
    assert exit_round(D, None, 1, 3) == 3
    assert exit_round(D, 0.5, 1, 2) == 1 and exit_round(D, 0.99, 1, 2) == 2


def test_calibrate_picks_lowest_threshold_that_keeps_the_ceiling_accuracy():
    res = calibrate(TRACES, min_rounds=1, max_rounds=3, percentiles=PCTS)
    # t=.5: everyone exits at round 1 -> only A right: 0.25. t=.825: A exits at 1 (right), B and C at
    # 3 (right), D at 1 (wrong): 0.75 with (10+30+30+10)/4 = 20 tokens. t=.97: all at 3: 0.75, 30.
    never, low, mid, high = res.candidates
    assert (low.percentile, low.threshold, low.accuracy, low.mean_tokens) == (0, 0.5, 0.25, 10)
    assert (mid.percentile, mid.accuracy, mid.mean_tokens) == (50, 0.75, 20)
    assert mid.threshold == pytest.approx(0.825)
    assert (high.threshold, high.accuracy, high.mean_tokens, high.exit_rate) == (0.97, 0.75, 30, 0.0)
    assert low.exit_rate == 1.0 and mid.exit_rate == 0.5
    assert res.threshold == pytest.approx(0.825)
    assert res.accuracy_ceiling == 0.75 and res.accuracy_exit == 0.75
    assert res.token_saving_fraction == pytest.approx(1 / 3)
    assert res.n == 4
    assert never.threshold is None and never.mean_tokens == 30 and never.mean_rounds == 3


def test_calibrate_tolerance_is_respected():
    # Tolerance 0.5 admits t=.5 (0.25 >= 0.75 - 0.5); 0.49 does not.
    assert calibrate(TRACES, min_rounds=1, max_rounds=3, tolerance=0.5, percentiles=PCTS).threshold == 0.5
    loose = calibrate(TRACES, min_rounds=1, max_rounds=3, tolerance=0.49, percentiles=PCTS)
    assert loose.threshold == pytest.approx(0.825)


def test_calibrate_falls_back_to_never_exit():
    # Any exit at round 1 loses the one right answer, which only round 2 has.
    res = calibrate([tr((0.9, False), (0.9, True))], min_rounds=1, max_rounds=2)
    assert res.threshold is None
    assert res.accuracy_exit == res.accuracy_ceiling == 1.0
    assert res.token_saving_fraction == 0.0
    # No confidence at all: never-exit is the only candidate.
    none = calibrate([tr((None, True), (None, True))], min_rounds=1, max_rounds=2)
    assert none.threshold is None and len(none.candidates) == 1


def test_calibrate_ignores_rounds_before_min_rounds():
    # With min_rounds 2 only rounds 2-3 count: sorted .6 .7 .7 .8 .85 .9 .95 .97 -> p0 = .6.
    res = calibrate(TRACES, min_rounds=2, max_rounds=3, percentiles=(0,))
    assert res.candidates[1].threshold == 0.6
    # t=.6: A, B exit at 2 (right), C at 2 (wrong), D at 2 (wrong): 0.5 < 0.75 - 0.01.
    assert res.candidates[1].accuracy == 0.5 and res.threshold is None


def test_calibrate_rejects_bad_input():
    with pytest.raises(ValueError):
        calibrate([], min_rounds=1, max_rounds=2)
    with pytest.raises(ValueError):
        calibrate(TRACES, min_rounds=3, max_rounds=2)


def rows(n_right: int, n_wrong: int, reason: str = "confidence") -> list[tuple[float, str, bool]]:
    return [(0.9, reason, True)] * n_right + [(0.9, reason, False)] * n_wrong


def test_online_threshold_needs_enough_confidence_exits():
    assert online_threshold(0.8, rows(0, 19), target_accuracy=0.9) == 0.8
    # ceiling exits say nothing about the threshold
    assert online_threshold(0.8, rows(0, 19) + rows(0, 30, "ceiling"), target_accuracy=0.9) == 0.8


def test_online_threshold_raises_below_target_and_keeps_otherwise():
    assert online_threshold(0.8, rows(10, 10), target_accuracy=0.9) == pytest.approx(0.82)
    assert online_threshold(0.8, rows(18, 2), target_accuracy=0.9) == 0.8  # at target
    assert online_threshold(0.8, rows(20, 0), target_accuracy=0.9) == 0.8  # above: never lowered
    # within tolerance: 0.89 >= 0.9 - 0.02
    assert online_threshold(0.8, rows(89, 11), target_accuracy=0.9, tolerance=0.02) == 0.8


def test_online_threshold_is_capped_and_never_lowers():
    assert online_threshold(0.98, rows(0, 20), target_accuracy=0.9) == 0.99
    assert online_threshold(0.995, rows(0, 20), target_accuracy=0.9) == 0.995


@pytest.fixture(scope="module")
def registry() -> DomainRegistry:
    return DomainRegistry.load(CONFIG)


def test_shipped_registry(registry):
    assert registry.default_domain == "general"
    assert {"general", "math", "logic", "legal", "financial", "medical"} <= set(registry.domains)
    assert registry.domains["math"].warmup and registry.domains["logic"].warmup
    assert not registry.domains["medical"].warmup


def test_detect_domain(registry):
    assert detect_domain("What dosage of this drug is safe for a patient?", registry) == (
        "medical",
        "keywords: dosage, drug, patient",
    )
    assert detect_domain("Calculate 17 * 25.", registry)[0] == "math"
    assert detect_domain("Does it logically follow from the premises?", registry)[0] == "logic"
    assert detect_domain("Tell me a story.", registry) == ("general", "no domain keywords")
    # most distinct hits win: one math word against two legal ones
    assert detect_domain("Calculate the liability under this contract.", registry)[0] == "legal"


def test_threshold_for(registry):
    assert registry.threshold_for("medical") == 0.9
    assert registry.threshold_for("nope") == registry.threshold_for("general")
    assert registry.threshold_for("math", {"math": 0.95}) == 0.95
    assert registry.threshold_for("math", {"logic": 0.95}) == registry.domains["math"].threshold


def test_registry_validation():
    with pytest.raises(ValidationError):
        DomainRegistry.model_validate({"default_domain": "x", "domains": {"y": {"threshold": 0.5}}})
    with pytest.raises(ValidationError):
        DomainRegistry.model_validate({"default_domain": "y", "domains": {"y": {"threshold": 1.5}}})
    with pytest.raises(ValidationError):
        DomainRegistry.model_validate({"domains": {"general": {"threshold": 0.5, "tier": "huge"}}})
    with pytest.raises(ValidationError):
        DomainRegistry.model_validate({"domains": {"general": {"threshold": 0.5, "extra": 1}}})


def test_save_calibration_round_trip(tmp_path, registry):
    path = tmp_path / "domains.yaml"
    shutil.copy(CONFIG, path)
    result = CalibrationResult(0.87654321, 0.8, 0.79, 0.25, 60)
    saved = save_calibration(path, "math", result, "qwen", at="2026-11-24")
    assert path.read_text().startswith(HEADER)
    assert [p.name for p in tmp_path.iterdir()] == ["domains.yaml"]  # no temp file left behind
    back = DomainRegistry.load(path)
    assert back == saved
    math = back.domains["math"]
    assert math.threshold == 0.8765
    assert math.calibration is not None
    assert math.calibration.model_dump() == {
        "threshold": 0.8765,
        "n_problems": 60,
        "accuracy_ceiling": 0.8,
        "accuracy_exit": 0.79,
        "token_saving_fraction": 0.25,
        "model": "qwen",
        "at": "2026-11-24",
    }
    assert math.warmup == registry.domains["math"].warmup
    assert {k: v for k, v in back.domains.items() if k != "math"} == {
        k: v for k, v in registry.domains.items() if k != "math"
    }
    # never-exit is stored as null
    save_calibration(path, "logic", CalibrationResult(None, 0.5, 0.5, 0.0, 40), "qwen", at="2026-11-24")
    assert DomainRegistry.load(path).domains["logic"].threshold is None
    with pytest.raises(ValueError):
        save_calibration(path, "nope", result, "qwen")


def test_a_calibration_or_tot_evidence_from_another_model_is_not_applied_and_says_so():
    from services.reasoning.domains import Calibration, TotEvidence

    reg = DomainRegistry.load(CONFIG)
    cal = Calibration(
        threshold=0.71,
        n_problems=40,
        accuracy_ceiling=0.8,
        accuracy_exit=0.8,
        token_saving_fraction=0.3,
        model="qwen2.5-coder-0.5b-instruct",
        at="2026-11-28",
    )
    tot = TotEvidence(
        pays=True,
        accuracy_tot=0.6,
        accuracy_chain=0.5,
        tokens_tot=1,
        tokens_chain=1,
        n_problems=9,
        model="qwen2.5-coder-0.5b-instruct",
        at="x",
    )
    math = reg.domains["math"].model_copy(update={"threshold": 0.71, "calibration": cal, "tot": tot})
    reg = reg.model_copy(update={"domains": {**reg.domains, "math": math}})
    same, warnings = reg.for_model("qwen2.5-coder-0.5b-instruct")
    assert warnings == [] and same.threshold_for("math") == 0.71 and same.domains["math"].tot is not None
    other, warnings = reg.for_model("smollm2-135m-instruct")
    assert other.threshold_for("math") is None and other.domains["math"].tot is None  # the tier's threshold
    assert (
        len(warnings) == 2 and "calibrated with 'qwen2.5-coder-0.5b-instruct', not the served" in warnings[0]
    )
    assert other.threshold_for("general") == reg.threshold_for("general")  # uncalibrated domains untouched
    assert reg.for_model(None) == (reg, [])


@pytest.mark.parametrize(
    ("tot", "chain", "pays"),
    [
        ([(True, 90), (True, 80), (False, 70)], [(True, 30), (False, 30), (False, 30)], True),  # more right
        ([(True, 90), (False, 80)], [(True, 30), (False, 30)], False),  # as many right, more tokens
        ([(True, 20), (False, 20)], [(True, 30), (False, 30)], True),  # as many right, fewer tokens
        ([(False, 90), (False, 80)], [(True, 30), (False, 30)], False),  # fewer right
    ],
)
def test_tot_evidence_pays_only_for_more_right_answers_or_the_same_for_less(tot, chain, pays):
    from services.reasoning.domains import tot_evidence

    ev = tot_evidence(tot, chain, "m", at="2026-11-28")
    assert ev.pays is pays and ev.n_problems == len(tot) and ev.model == "m"
    assert ev.accuracy_tot == round(sum(c for c, _ in tot) / len(tot), 4)
    assert ev.tokens_chain == round(sum(t for _, t in chain) / len(chain), 1)
    with pytest.raises(ValueError, match="same problems"):
        tot_evidence(tot, chain[:1], "m")


def test_tot_evidence_is_written_into_the_domain_and_the_planner_reads_it(tmp_path):
    import shutil

    from services.reasoning.domains import save_tot_evidence, tot_evidence

    path = tmp_path / "domains.yaml"
    shutil.copy(CONFIG, path)
    before = DomainRegistry.load(path)
    ev = tot_evidence([(True, 50)], [(False, 30)], "m", at="2026-11-28")
    after = save_tot_evidence(path, "math", ev)
    assert DomainRegistry.load(path) == after and after.domains["math"].tot == ev
    untouched = {n: d for n, d in after.domains.items() if n != "math"}
    assert untouched == {n: d for n, d in before.domains.items() if n != "math"}
    assert after.domains["math"].threshold == before.domains["math"].threshold
    with pytest.raises(ValueError, match="unknown domain"):
        save_tot_evidence(path, "nope", ev)
