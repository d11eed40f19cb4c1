from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.reasoning.tiers import (
    Action,
    PlanError,
    Reason,
    RoundPlan,
    TierTable,
    decide,
    make_plan,
)

TIERS = Path(__file__).resolve().parents[2] / "configs" / "tiers.yaml"


@pytest.fixture(scope="module")
def table() -> TierTable:
    return TierTable.load(TIERS)


def test_shipped_table_matches_the_source_document(table):
    t = table.tiers
    assert (t["low"].min_rounds, t["low"].max_rounds) == (1, 2)
    assert (t["medium"].min_rounds, t["medium"].max_rounds) == (3, 4)
    assert t["medium"].confidence_threshold == 0.82
    assert (t["high"].min_rounds, t["high"].max_rounds) == (4, 6)
    assert (t["critical"].min_rounds, t["critical"].max_rounds) == (5, 6)


def test_table_rejects_unknown_or_missing_tiers(tmp_path):
    raw = yaml.safe_load(TIERS.read_text())
    raw["tiers"]["extreme"] = raw["tiers"]["high"]
    unknown = r"tiers\.extreme\.\[key\][\s\S]*'low', 'medium', 'high' or 'critical'"
    with pytest.raises(ValidationError, match=unknown):
        TierTable.model_validate(raw)
    raw = yaml.safe_load(TIERS.read_text())
    del raw["tiers"]["critical"]
    with pytest.raises(ValidationError, match=r"missing \['critical'\]"):
        TierTable.model_validate(raw)
    raw = yaml.safe_load(TIERS.read_text())
    raw["default_tier"] = "urgent"
    with pytest.raises(ValidationError, match="default_tier"):
        TierTable.model_validate(raw)
    raw = yaml.safe_load(TIERS.read_text())
    raw["tiers"]["low"]["min_rounds"] = 3
    with pytest.raises(ValidationError, match="min_rounds 3 > max_rounds 2"):
        TierTable.model_validate(raw)


def _core(p: RoundPlan) -> tuple:
    return (p.tier, p.min_rounds, p.max_rounds, p.confidence_threshold)


def test_plan_defaults_and_overrides(table):
    assert _core(make_plan(table)) == ("medium", 3, 4, 0.82)
    assert _core(make_plan(table, "low")) == ("low", 1, 2, 0.82)
    assert _core(make_plan(table, "high", max_rounds=2)) == ("high", 2, 2, 0.82)
    assert _core(make_plan(table, "medium", min_rounds=1, confidence_threshold=0.5)) == (
        "medium",
        1,
        4,
        0.5,
    )


def test_plan_carries_the_tiers_strategy_rule_and_review(table):
    medium, high, critical = (make_plan(table, t) for t in ("medium", "high", "critical"))
    assert (medium.strategy, medium.exit_rule) == ("cot", {"stable_for": 2, "mode": "any"})
    assert high.strategy == "tot" and high.tot["branching"] == 2 and high.tot["max_total_nodes"] == 10
    assert critical.review and not medium.review
    assert make_plan(table, "high", strategy="cot").tot is None  # a request may ask for a plain chain


def test_threshold_precedence_request_then_domain_then_tier(table):
    assert make_plan(table, "medium").confidence_threshold == 0.82
    assert make_plan(table, "medium", domain_threshold=0.7).confidence_threshold == 0.7
    assert (
        make_plan(table, "medium", domain_threshold=0.7, confidence_threshold=0.95).confidence_threshold
        == 0.95
    )


def test_tot_overrides_narrow_never_widen(table):
    assert make_plan(table, "high", tot={"branching": 1, "max_total_nodes": 4}).tot["branching"] == 1
    with pytest.raises(PlanError) as err:
        make_plan(table, "high", tot={"max_total_nodes": 11})
    assert err.value.param == "reasoning.tot.max_total_nodes"
    with pytest.raises(PlanError, match="unknown strategy"):
        make_plan(table, "high", strategy="mcts")


def test_exit_rule_any_exits_on_a_stable_answer_all_needs_both():
    from services.reasoning.signals import Signals

    unsure_but_stable = Signals(0.5, None, None, None, 40, stable_rounds=2)
    sure_not_stable = Signals(0.95, None, None, None, 40, stable_rounds=1)
    any_plan = RoundPlan("medium", 3, 4, 0.82, exit_rule={"stable_for": 2, "mode": "any"})
    all_plan = RoundPlan("critical", 5, 6, 0.9, exit_rule={"stable_for": 2, "mode": "all"})
    v = decide(any_plan, 3, unsure_but_stable)
    assert v.reason is Reason.STABLE and "stable_rounds 2 >= 2" in v.detail  # held by stability alone
    assert decide(any_plan, 3, sure_not_stable).reason is Reason.CONFIDENCE
    assert decide(all_plan, 5, unsure_but_stable).reason is Reason.BELOW_THRESHOLD
    assert decide(all_plan, 5, sure_not_stable).reason is Reason.BELOW_THRESHOLD
    both = Signals(0.95, None, None, None, 40, stable_rounds=3)
    assert decide(all_plan, 5, both).reason is Reason.CONFIDENCE
    # min_rounds is never bypassed, whatever the signals
    assert decide(all_plan, 4, both).reason is Reason.MIN_ROUNDS


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tier": "extreme"}, "reasoning.tier"),
        ({"tier": "low", "max_rounds": 3}, "reasoning.max_rounds"),
        ({"tier": "medium", "max_rounds": 0}, "reasoning.max_rounds"),
        ({"tier": "medium", "min_rounds": 5}, "reasoning.min_rounds"),
        ({"tier": "medium", "max_rounds": 2, "min_rounds": 3}, "reasoning.min_rounds"),
    ],
)
def test_plan_errors_name_the_field(table, kwargs, param):
    tier = kwargs.pop("tier")
    with pytest.raises(PlanError) as err:
        make_plan(table, tier, **kwargs)
    assert err.value.param == param


def test_decide_order_of_guards():
    plan = RoundPlan("medium", 3, 4, 0.82)
    assert decide(plan, 1, 1.0).reason is Reason.MIN_ROUNDS  # min_rounds beats confidence
    assert decide(plan, 2, 1.0).action is Action.CONTINUE
    assert decide(plan, 3, 0.9).reason is Reason.CONFIDENCE
    assert decide(plan, 3, 0.5).reason is Reason.BELOW_THRESHOLD
    assert decide(plan, 3, None).action is Action.CONTINUE
    assert decide(plan, 4, 0.0).reason is Reason.CEILING  # ceiling beats low confidence


def test_no_threshold_runs_to_the_ceiling():
    plan = RoundPlan("x", 1, 3, None)
    assert [decide(plan, n, 1.0).action for n in (1, 2, 3)] == [
        Action.CONTINUE,
        Action.CONTINUE,
        Action.EXIT,
    ]


def test_app_config_refuses_a_missing_referenced_file(tmp_path):
    from services.config import DEFAULT_CONFIG, AppConfig

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(raw))  # tiers.yaml is not beside it
    with pytest.raises(FileNotFoundError, match="tiers.yaml"):
        AppConfig.load(tmp_path / "app.yaml")
    # the scorer fitted to the served model, resolved beside the config
    fitted = DEFAULT_CONFIG.parent / "complexity-qwen2.5-coder-0.5b.yaml"
    assert AppConfig.load(DEFAULT_CONFIG).router.complexity_file == str(fitted)


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    from cluster.cli import main

    (tmp_path / "bad.yaml").write_text("engine: {model: x, max_model_len: -1}\n")
    assert main(["serve", "--config", str(tmp_path / "bad.yaml")]) == 1
    assert "invalid config" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err


def test_a_thinking_budget_narrows_the_ceiling_to_its_segments_and_never_widens_it(table):
    seg = table.tiers["medium"].segment_tokens
    p = make_plan(table, "medium", thinking_budget=seg + 1)
    assert (p.max_rounds, p.min_rounds, p.thinking_budget) == (2, 2, seg + 1)  # 2 segments, the 2nd cut
    assert make_plan(table, "medium", thinking_budget=seg, max_rounds=3).max_rounds == 1
    most = table.tiers["medium"].max_rounds * seg
    with pytest.raises(PlanError) as e:
        make_plan(table, "medium", thinking_budget=most + 1)
    assert e.value.param == "thinking_token_budget" and str(most) in str(e.value)
    assert (
        make_plan(table, "medium").mode == "thinking"
        and make_plan(table, "low", mode="rounds").mode == "rounds"
    )


def test_thinking_tokens_of_a_plan_are_its_segments_or_its_budget():
    from services.reasoning.thinking import max_thinking_tokens, min_thinking_tokens

    p = RoundPlan("t", 2, 4, None, segment_tokens=32)
    assert (min_thinking_tokens(p), max_thinking_tokens(p)) == (64, 128)
    q = RoundPlan("t", 2, 2, None, segment_tokens=32, thinking_budget=40)
    assert (min_thinking_tokens(q), max_thinking_tokens(q)) == (40, 40)  # the least never above the most
