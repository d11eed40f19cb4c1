"""Round prompts (pure): round 0 drafts, each later round verifies and restates the final answer.

The instructions are per model family (configs/prompts.yaml, `PromptFamilies`): the first family
whose pattern matches the served model's name gives the draft and verify instructions.

The transcript only ever grows at its end (user messages, then draft, verify request, verification,
...), so every round's prompt extends the previous one and the engine's prefix cache (and later the
KV store) reuses the earlier rounds instead of recomputing them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.reasoning.confidence import ANSWER_MARKER

DRAFT_INSTRUCTION = (
    "Think step by step. End your reply with a last line of the form 'Final answer: <answer>'."
)
VERIFY_INSTRUCTION = (
    "Check the answer above step by step. If you find a mistake, correct it. "
    "End your reply with a last line of the form 'Final answer: <answer>'."
)
CLOSE = "Final answer:"  # what a round cut before its answer line is closed with (services/loop/closing.py)
CLOSE_TOKENS = 16


@dataclass(frozen=True)
class RoundPrompts:
    """What a chain's rounds ask: the draft instruction (system) and the verify request (user); how
    a round cut at its token cap before it stated an answer is closed (`close_tokens` 0: never)."""

    draft: str = DRAFT_INSTRUCTION
    verify: str = VERIFY_INSTRUCTION
    family: str = "default"
    close: str = CLOSE
    close_tokens: int = CLOSE_TOKENS


DEFAULT_PROMPTS = RoundPrompts()


class PromptFamily(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(
        description="Regular expression searched in the served model's name (case-insensitive)."
    )
    draft: str = Field(min_length=1, description="System instruction of every round (with the client's own).")
    verify: str = Field(min_length=1, description="User message after each earlier round.")
    why: str = Field("", description="What this family's wording is for, and what it was measured to do.")
    close: str = Field(
        CLOSE,
        description="Written on a new line after a round cut at its token cap with no answer line; "
        "the model completes that line. Must contain 'Final answer:' (what answers are read from).",
    )
    close_tokens: int = Field(
        CLOSE_TOKENS, ge=0, le=64, description="Most tokens the model writes after `close`; 0: never close."
    )

    @model_validator(mode="after")
    def _close_reads_as_an_answer(self) -> PromptFamily:
        if self.close_tokens and ANSWER_MARKER not in self.close.lower():
            raise ValueError(f"close {self.close!r} must contain 'Final answer:' (answers are read from it)")
        return self


class PromptFamilies(BaseModel):
    """configs/prompts.yaml: round prompts per model family, first match wins; the built-in ones else."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    families: dict[str, PromptFamily] = Field(default_factory=dict, description="Family name -> prompts.")

    @model_validator(mode="after")
    def _patterns_compile(self) -> PromptFamilies:
        for name, f in self.families.items():
            try:
                re.compile(f.match)
            except re.error as exc:
                raise ValueError(
                    f"family {name!r}: match {f.match!r} is not a regular expression: {exc}"
                ) from exc
        return self

    @classmethod
    def load(cls, path: str | Path) -> PromptFamilies:
        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f) or {})

    def for_model(self, model: str) -> RoundPrompts:
        for name, f in self.families.items():
            if re.search(f.match, model, re.IGNORECASE):
                return RoundPrompts(f.draft.strip(), f.verify.strip(), name, f.close.strip(), f.close_tokens)
        return DEFAULT_PROMPTS


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def round_messages(
    conversation: Sequence[Message], earlier_rounds: Sequence[str], prompts: RoundPrompts = DEFAULT_PROMPTS
) -> list[Message]:
    """Chat messages for the next round, given the client's conversation and earlier round texts."""
    msgs = _with_instruction(conversation, prompts.draft)
    for text in earlier_rounds:
        msgs.append(Message("assistant", text))
        msgs.append(Message("user", prompts.verify))
    return msgs


def _with_instruction(conversation: Sequence[Message], draft: str) -> list[Message]:
    # The drafting instruction joins the client's system prompt (or becomes one), so the client's
    # own instructions keep their place and models without a system role still see it first.
    msgs = list(conversation)
    if msgs and msgs[0].role in ("system", "developer"):
        return [Message("system", f"{msgs[0].content}\n\n{draft}"), *msgs[1:]]
    return [Message("system", draft), *msgs]
