"""Fit a reasoning transcript to a token budget, counted exactly with the model's tokenizer (pure).

Every round's prompt is the client's conversation plus all earlier rounds (prompts.round_messages).
When that no longer fits the context, older rounds give way, oldest first: first each is condensed to
its final-answer line, then they are dropped (each with its verify instruction, so roles keep
alternating). The system prompt, the client's messages and the latest round always stay verbatim.
Counts come from `count`, which renders with the real chat template; nothing is estimated, and every
step is re-counted. Pruning changes the prompt's prefix (the prefix cache no longer matches from the
first changed round on), so it happens only when the full transcript does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass

from services.reasoning.confidence import ANSWER_MARKER
from services.reasoning.prompts import DEFAULT_PROMPTS, Message, RoundPrompts, round_messages
from services.reasoning.signals import extract_answer

Count = Callable[[list[Message]], int]
_MARKER = re.compile(re.escape(ANSWER_MARKER), re.IGNORECASE)


class PruneError(ValueError):
    """Even the conversation and the latest round alone exceed the budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(
            f"the conversation and the latest round alone need {needed} tokens; the budget is {budget}"
        )
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class Pruned:
    messages: list[Message]
    tokens: int  # exact: count(messages)
    kept: tuple[int, ...]  # round indices (0 = the draft) kept verbatim; the latest always is
    condensed: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def pruned(self) -> bool:
        return bool(self.condensed or self.dropped)


def condense(index: int, text: str) -> str:
    """A round reduced to its final-answer line, or a note that it was omitted.

    The answer is the one signals.extract_answer finds (the first line after the last marker), but as
    the round wrote it, not normalised: the model should read its own words back.
    """
    if extract_answer(text) is None:
        return f"[round {index} omitted]"
    rest = text[list(_MARKER.finditer(text))[-1].end() :].strip().lstrip("*_")
    line = rest.strip().splitlines()[0].strip().strip("*_").strip()  # "**Final answer:** 42"
    return f"[round {index} condensed] Final answer: {line}"


def build_messages(
    conversation: Sequence[Message],
    rounds: Sequence[str],
    condensed: Set[int],
    dropped: Set[int],
    prompts: RoundPrompts = DEFAULT_PROMPTS,
) -> list[Message]:
    """round_messages over the rounds that remain: a dropped round is left out of the transcript, which
    removes its assistant message and the verify request after it together."""
    texts = [condense(i, t) if i in condensed else t for i, t in enumerate(rounds) if i not in dropped]
    return round_messages(conversation, texts, prompts)


def fit_transcript(
    conversation: Sequence[Message],
    earlier_rounds: Sequence[str],
    budget: int,
    count: Count,
    prompts: RoundPrompts = DEFAULT_PROMPTS,
) -> Pruned:
    """The next round's messages within `budget` tokens; exactly round_messages when they fit.

    Raises PruneError when even the conversation and the latest round (all older rounds dropped)
    need more than `budget`.
    """
    n = len(earlier_rounds)
    messages = round_messages(conversation, earlier_rounds, prompts)
    tokens = count(messages)
    if tokens <= budget:
        return Pruned(messages, tokens, tuple(range(n)), (), ())
    fit = _Fit(conversation, earlier_rounds, count, messages, tokens, prompts)
    older = range(n - 1)  # the latest round never changes
    for i in older:
        if fit.tokens <= budget:
            break
        fit.condense(i)
    for i in older:
        if fit.tokens <= budget:
            break
        fit.drop(i)
    if fit.tokens > budget:
        raise PruneError(fit.tokens, budget)
    kept = tuple(i for i in range(n) if i not in fit.condensed and i not in fit.dropped)
    return Pruned(fit.messages, fit.tokens, kept, tuple(sorted(fit.condensed)), tuple(sorted(fit.dropped)))


class _Fit:
    """The transcript being cut, with the exact count of its current messages."""

    def __init__(
        self,
        conversation: Sequence[Message],
        rounds: Sequence[str],
        count: Count,
        messages: list[Message],
        tokens: int,
        prompts: RoundPrompts,
    ) -> None:
        self._conversation, self._rounds, self._count, self._prompts = conversation, rounds, count, prompts
        self.messages, self.tokens = messages, tokens
        self.condensed: set[int] = set()
        self.dropped: set[int] = set()

    def _try(self, condensed: set[int], dropped: set[int]) -> tuple[list[Message], int]:
        messages = build_messages(self._conversation, self._rounds, condensed, dropped, self._prompts)
        return messages, self._count(messages)

    def condense(self, i: int) -> None:
        messages, tokens = self._try(self.condensed | {i}, self.dropped)
        if tokens < self.tokens:  # a round already shorter than its note stays verbatim
            self.condensed.add(i)
            self.messages, self.tokens = messages, tokens

    def drop(self, i: int) -> None:
        self.condensed.discard(i)
        self.dropped.add(i)
        self.messages, self.tokens = self._try(self.condensed, self.dropped)
