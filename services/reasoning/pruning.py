"""Fit a reasoning transcript to a token budget, counted exactly with the model's tokenizer (pure).

Every round's prompt is the client's conversation plus all earlier rounds (prompts.round_messages).
When that no longer fits the context, older rounds give way, oldest first: first each is condensed to
its final-answer line, then condensed rounds are dropped (with their verify instruction, so roles keep
alternating). The system prompt, the client's messages and the latest round always stay verbatim.
Counts come from `count`, which renders with the real chat template; nothing is estimated.
Pruning changes the prompt's prefix (the prefix cache no longer matches), so it happens only when
the full transcript does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.reasoning.confidence import ANSWER_MARKER
from services.reasoning.prompts import Message, round_messages

Count = Callable[[list[Message]], int]
_MARKER = re.compile(re.escape(ANSWER_MARKER), re.IGNORECASE)


class PruneError(ValueError):
    """Even the conversation and the latest round alone exceed the budget."""


@dataclass(frozen=True)
class Pruned:
    messages: list[Message]
    tokens: int  # exact: count(messages)
    kept: tuple[int, ...]  # round indices kept verbatim
    condensed: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def pruned(self) -> bool:
        return bool(self.condensed or self.dropped)


def condense(index: int, text: str) -> str:
    """A round reduced to its last final-answer line (as written), or a note that it was omitted."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return f"[round {index} omitted]"
    rest = text[matches[-1].end() :].strip().lstrip("*_").strip()  # "**Final answer:** 42"
    line = rest.splitlines()[0] if rest else ""
    return f"[round {index} condensed] Final answer: {line}".rstrip()


def _build(conversation: Sequence[Message], rounds: Sequence[str], state: list[str]) -> list[Message]:
    texts = [
        condense(i, t) if s == "condensed" else t
        for i, (t, s) in enumerate(zip(rounds, state, strict=True))
        if s != "dropped"
    ]
    return round_messages(conversation, texts)


def fit_transcript(
    conversation: Sequence[Message], earlier_rounds: Sequence[str], budget: int, count: Count
) -> Pruned:
    """The next round's messages within `budget` tokens; unchanged when they already fit."""
    n = len(earlier_rounds)
    state = ["kept"] * n
    messages = _build(conversation, earlier_rounds, state)
    tokens = count(messages)
    # Steps, oldest first: condense rounds 0..n-2, then drop them; the latest round never changes.
    steps = [(i, "condensed") for i in range(n - 1)] + [(i, "dropped") for i in range(n - 1)]
    for i, action in steps:
        if tokens <= budget:
            break
        state[i] = action
        messages = _build(conversation, earlier_rounds, state)
        tokens = count(messages)
    if tokens > budget:
        raise PruneError(
            f"the conversation and the latest round need {tokens} tokens; the budget is {budget}"
        )
    pick = lambda s: tuple(i for i in range(n) if state[i] == s)  # noqa: E731
    return Pruned(messages, tokens, pick("kept"), pick("condensed"), pick("dropped"))
