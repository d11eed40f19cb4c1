"""Round prompts per model family (services/reasoning/prompts.py, configs/prompts.yaml)."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.reasoning.prompts import (
    DEFAULT_PROMPTS,
    Message,
    PromptFamilies,
    RoundPrompts,
    round_messages,
)
from services.reasoning.pruning import fit_transcript

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "prompts.yaml"


def test_the_shipped_file_gives_every_model_the_built_in_wording():
    """A Qwen family was measured worse than the default wording and is not shipped (docs/benchmarks.md)."""
    fams = PromptFamilies.load(SHIPPED)
    for model in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "llama-3.1-8b"):
        p = fams.for_model(model)
        assert p.family == "default"
        assert (p.draft, p.verify) == (DEFAULT_PROMPTS.draft, DEFAULT_PROMPTS.verify)
    assert PromptFamilies().for_model("anything") is DEFAULT_PROMPTS  # no file entries: built-in


def test_first_match_wins_case_insensitively():
    fams = PromptFamilies.model_validate(
        {
            "families": {
                "a": {"match": "^Llama-3", "draft": "A draft", "verify": "A verify"},
                "b": {"match": "llama", "draft": "B draft", "verify": "B verify"},
            }
        }
    )
    assert fams.for_model("llama-3.1-8b").family == "a" and fams.for_model("tinyllama").family == "b"


def test_a_bad_pattern_or_an_empty_instruction_is_refused_at_load():
    with pytest.raises(ValidationError, match="not a regular expression"):
        PromptFamilies.model_validate({"families": {"x": {"match": "(", "draft": "d", "verify": "v"}}})
    with pytest.raises(ValidationError):
        PromptFamilies.model_validate({"families": {"x": {"match": "x", "draft": "", "verify": "v"}}})


def test_rounds_use_the_familys_instructions_and_pruning_keeps_them():
    p = RoundPrompts("Show your work.", "Solve it again.", "custom")
    conv = [Message("system", "Be brief."), Message("user", "2+2?")]
    msgs = round_messages(conv, ["four", "4"], p)
    assert msgs[0] == Message("system", "Be brief.\n\nShow your work.")
    assert [m.content for m in msgs if m.role == "user"] == ["2+2?", "Solve it again.", "Solve it again."]
    fitted = fit_transcript(conv, ["four", "4"], 10_000, lambda m: sum(len(x.content) for x in m), p)
    assert fitted.messages == msgs


def test_a_familys_closing_must_read_as_an_answer():
    fam = {"match": "x", "draft": "d", "verify": "v"}
    p = PromptFamilies.model_validate({"families": {"x": {**fam, "close": "ANSWER: ", "close_tokens": 0}}})
    assert p.for_model("x").close_tokens == 0  # off: any text
    got = PromptFamilies.model_validate({"families": {"x": {**fam, "close": "So the final answer:"}}})
    assert got.for_model("x").close == "So the final answer:" and got.for_model("x").close_tokens == 16
    with pytest.raises(ValidationError, match="must contain 'Final answer:'"):
        PromptFamilies.model_validate({"families": {"x": {**fam, "close": "Answer:"}}})
    with pytest.raises(ValidationError):
        PromptFamilies.model_validate({"families": {"x": {**fam, "close_tokens": 65}}})
