from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.reasoning.complexity import (
    ComplexityConfig,
    count_arithmetic,
    count_code,
    count_keywords,
    count_numbers,
    count_questions,
    count_words,
    keyword_pattern,
    score,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "complexity.yaml"


@pytest.fixture(scope="module")
def cfg() -> ComplexityConfig:
    return ComplexityConfig.load(CONFIG)


def test_shipped_yaml_equals_the_defaults(cfg):
    assert cfg.model_dump() == ComplexityConfig().model_dump()
    assert (cfg.thresholds.medium, cfg.thresholds.high) == (1.5, 5.0)


def test_one_line_factual_question_is_low(cfg):
    # 6 words * 0.02 + 1 question * 0.5 = 0.62 < 1.5
    a = score("What is the capital of France?", cfg)
    assert a.tier == "low"
    assert a.score == pytest.approx(0.62)
    assert a.reason == "score 0.62 (1 question, 6 words) < medium threshold 1.5"


def test_multi_step_arithmetic_word_problem_is_medium(cfg):
    text = (
        "A train travels at 60 km/h for 2 hours, then at 80 km/h for 3 hours. "
        "What is the total distance it covers? Show each step."
    )
    a = score(text, cfg)
    # 26 words, 1 question, constraint "each", planning "then" + "step", numbers 60 2 80 3;
    # km/h is not arithmetic (no operand either side of the slash).
    assert a.features["words"] == 26
    assert (a.features["questions"], a.features["constraints"], a.features["planning"]) == (1, 1, 2)
    assert (a.features["numbers"], a.features["arithmetic"]) == (4, 0)
    # 0.52 + 0.5 + 0.5 + 1.5 + 1.0 = 4.02: medium (>= 1.5, < 5.0)
    assert a.score == pytest.approx(4.02)
    assert a.tier == "medium"
    assert a.reason.startswith("score 4.02 (2 planning markers, 4 numbers, 26 words, 1 question)")
    assert a.reason.endswith(">= medium threshold 1.5")


def test_planning_and_constraint_prompt_is_high(cfg):
    text = (
        "Design a weekly on-call schedule for 5 engineers. Each engineer must work at least 2 days "
        "and at most 3 days, and no engineer should work two weekends in a row. First plan the "
        "rotation, then optimize it for fairness and compare the trade-offs of the two best options."
    )
    a = score(text, cfg)
    # planning: design schedule first plan then optimize compare trade-offs = 8
    # constraints: each must "at least" "at most" should = 5; numbers 5 2 3; 49 words
    assert (a.features["planning"], a.features["constraints"], a.features["numbers"]) == (8, 5, 3)
    assert a.features["words"] == 49
    # 8*0.75 + 5*0.5 + 3*0.25 + 49*0.02 = 6 + 2.5 + 0.75 + 0.98 = 10.23
    assert a.score == pytest.approx(10.23)
    assert a.tier == "high"
    assert a.reason.endswith(">= high threshold 5")


def test_medical_dosage_question_is_critical_whatever_the_score(cfg):
    a = score("What is the maximum safe dosage of ibuprofen for an elderly patient with kidney disease?", cfg)
    assert a.score < cfg.thresholds.medium  # the domain wins over a low score
    assert a.tier == "critical"
    assert a.reason == "critical domain: medical (dosage, patient, disease)"
    assert a.features["domain_medical"] == 3


def test_one_domain_keyword_is_not_enough(cfg):
    # domain_min_hits is 2 distinct keywords; a repeated one counts once
    a = score("Review this contract. The contract is short.", cfg)
    assert a.features["domain_legal"] == 1
    assert a.tier == "low"


def test_the_domain_with_most_hits_wins(cfg):
    a = score("The patient asked about tax on a loan and the audit of her portfolio.", cfg)
    assert a.tier == "critical"
    assert a.reason == "critical domain: financial (tax, loan, audit, portfolio)"


def test_empty_text_is_low(cfg):
    a = score("", cfg)
    assert a.tier == "low"
    assert a.score == 0
    assert a.reason == "score 0.00 < medium threshold 1.5"


def test_exact_feature_counts_on_small_inputs(cfg):
    assert count_words("  one two\nthree  ") == 3
    assert count_questions("Why? How?? ") == 3
    # "at least" is one phrase, "Every"/"ALL" match case-insensitively, "install" is not "all"
    assert count_keywords("Every item, at least ALL of them; install it", cfg.pattern("constraints")) == 3
    # word boundaries: "steps" matches (plural), "footstep" and "thence" do not
    assert count_keywords("Two steps, a footstep, thence", cfg.pattern("planning")) == 1
    assert count_numbers("Add 1,000 and 2.5 to 7, not x2 or v1.2") == 3
    assert count_arithmetic("2 + 3 * 4 = 14") == 3
    assert count_arithmetic("x = 3, well-known, km/h") == 1
    code = "```python\ndef f(x):\n    return {x};\n```"
    # 1 fence pair + { } ; + def + return = 6
    assert count_code(code, cfg.pattern("code")) == 6


def test_keyword_pattern_phrases_and_plurals():
    p = keyword_pattern(["trade-off", "at least", "tax"])
    assert p is not None
    assert [m.group(0) for m in p.finditer("trade-offs AT  LEAST taxes syntax")] == [
        "trade-offs",
        "AT  LEAST",
        "taxes",
    ]
    assert keyword_pattern([]) is None


def test_thresholds_must_increase():
    with pytest.raises(ValidationError, match="thresholds must increase"):
        ComplexityConfig.model_validate({"thresholds": {"medium": 5.0, "high": 5.0}})


def test_unknown_fields_are_rejected(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text()) | {"typo_field": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValidationError, match="typo_field"):
        ComplexityConfig.load(path)
    with pytest.raises(ValidationError):
        ComplexityConfig.model_validate({"thresholds": {"medium": 1.0, "high": 2.0, "critical": 3.0}})


def test_weights_must_name_every_feature_exactly():
    weights = ComplexityConfig().model_dump()["weights"]
    del weights["code"]
    with pytest.raises(ValidationError, match="missing \\['code'\\]"):
        ComplexityConfig.model_validate({"weights": weights})
    weights["code"] = {"weight": 1.0, "cap": 1.0}
    weights["emoji"] = {"weight": 1.0, "cap": 1.0}
    with pytest.raises(ValidationError, match="unknown \\['emoji'\\]"):
        ComplexityConfig.model_validate({"weights": weights})


def test_caps_bound_a_feature(cfg):
    # 20 questions capped at 6: 6 * 0.5 + 20 words * 0.02 = 3.4
    a = score(" ".join(["why?"] * 20), cfg)
    assert a.features["questions"] == 20
    assert a.score == pytest.approx(3.4)


def test_scoring_is_deterministic(cfg):
    text = "First compare, then design a plan. Must it be exact?"
    assert score(text, cfg) == score(text, cfg)
    assert score(text.upper(), cfg).features == score(text, cfg).features
