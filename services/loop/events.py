"""What the reasoning loop yields and what it is given: event and outcome types, the callables the
router or a benchmark injects (generate, expand, decide, ToT grants), and the tokenizer protocol.

Kept apart from the loop itself (services/loop/orchestrator.py) so Tree-of-Thought
(services/loop/tot_run.py) uses the same types without importing the orchestrator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.reasoning.loop import RoundRecord
from services.reasoning.prompts import Message
from services.reasoning.signals import Signals
from services.reasoning.tiers import Reason, RoundPlan, Verdict, decide
from services.worker.engine import GenerateDelta, GenerateResult, SamplingSpec

GenerateFn = Callable[[str, list[int], SamplingSpec], AsyncIterator[GenerateDelta]]
# (request id, prompt, sampling, n) -> n children of the prompt in one engine request (ToT).
ExpandFn = Callable[[str, list[int], SamplingSpec, int], Awaitable[list[GenerateResult]]]
GrantFn = Callable[[int], Awaitable[int]]  # ToT: nodes wanted -> nodes granted by depth control
ReleaseFn = Callable[[int], Awaitable[None]]
# (plan, rounds done, the last round's signals) -> verdict, or None to decide locally.
DecideFn = Callable[[RoundPlan, int, Signals], Awaitable[Verdict | None]]


async def local_decide(plan: RoundPlan, rounds_done: int, signals: Signals) -> Verdict:
    """The pure policy as a DecideFn: for runs without a depth-control actor (benchmarks, tests)."""
    return decide(plan, rounds_done, signals)


class Tokenizer(Protocol):
    def render(self, messages: Sequence[Message]) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def encode(self, text: str) -> list[int]: ...


class ContextLengthError(ValueError):
    """The first round's prompt does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_model_len: int, min_round_tokens: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens; the messages take "
            f"{prompt_tokens} tokens with Ponder's reasoning instructions, leaving fewer than "
            f"{min_round_tokens} for an answer. Shorten the messages."
        )
        self.prompt_tokens = prompt_tokens


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str


@dataclass
class RoundDone:
    record: RoundRecord
    verdict: Verdict
    segment: bool = False  # a thinking segment: reasoning even when it ends the loop (the answer follows)

    @property
    def answers(self) -> bool:
        """Whether this round's text is the request's answer (a chain's last round)."""
        return self.verdict.exit and not self.segment


@dataclass
class Outcome:
    plan: RoundPlan
    rounds: list[RoundRecord]  # the chain of rounds behind the answer (ToT: the best path)
    exit_reason: Reason
    content: str
    reasoning_content: str
    tot: dict | None = None  # Tree-of-Thought summary: nodes, depth, branching, best_path, ...
    # ToT generates nodes off the best path too; these count every token it spent. None: the rounds'.
    all_prompt_tokens: int | None = None
    all_completion_tokens: int | None = None
    thinking: dict | None = None  # thinking mode: tokens, segments, budget, how the trace closed

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish_reason of the answer: its final round's ("length": cut at max_tokens)."""
        return self.rounds[-1].finish_reason if self.rounds else "stop"

    @property
    def total_prompt_tokens(self) -> int:
        return self.prompt_tokens if self.all_prompt_tokens is None else self.all_prompt_tokens

    @property
    def total_completion_tokens(self) -> int:
        return self.completion_tokens if self.all_completion_tokens is None else self.all_completion_tokens

    @property
    def total_reasoning_tokens(self) -> int:
        """Every completion token but the final answer's: the reasoning tax."""
        final = self.rounds[-1].completion_tokens if self.rounds else 0
        return self.total_completion_tokens - final

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.rounds)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.rounds)

    @property
    def reasoning_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.rounds[:-1])

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.rounds)


@dataclass
class Finished:
    outcome: Outcome


Event = ReasoningDelta | ContentDelta | RoundDone | Finished
