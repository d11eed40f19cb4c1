"""Per-round confidence signals and a configurable exit rule (pure).

DeepConf token confidence (Fu et al., "Deep Think with Confidence"): C_i = -mean of the top-k logprobs
at token i. A peaked distribution has one logprob near 0 and the rest very negative, so a large C_i
means confident. Unlike the normalised entropy of confidence.py it is unbounded above and depends on
k, so thresholds on it are only comparable across runs with the same top-k.

Group signals catch what a mean hides: a single stretch of hesitation inside an otherwise fluent
round. `lowest_group_confidence` is the weakest sliding window; `tail_confidence` looks at the end of
the round, where the answer is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.reasoning.confidence import ANSWER_MARKER, TopLogprobs, mean_confidence, sampled

DEFAULT_WINDOW = 16
DEFAULT_TAIL = 64


def deepconf_token_confidence(top: TopLogprobs) -> float:
    """C_i = -mean logprob of the top-k entries, the sampled token de-duplicated by id."""
    lps = {tid: lp for tid, lp in top}  # as confidence.py: the sampled token may repeat a top-k one
    if not lps:
        raise ValueError("a token needs at least one (token_id, logprob) entry")
    return -sum(lps.values()) / len(lps)


def token_confidences(logprobs: Sequence[TopLogprobs]) -> list[float]:
    return [deepconf_token_confidence(t) for t in sampled(logprobs)]  # the router's own tokens: none


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def group_confidences(confs: Sequence[float], window: int = DEFAULT_WINDOW) -> list[float]:
    """Mean C_i per sliding window (stride 1); fewer tokens than `window` make one group of all."""
    if window < 1:
        raise ValueError("window must be at least 1")
    if len(confs) <= window:
        return [sum(confs) / len(confs)] if confs else []
    prefix = [0.0]
    for c in confs:  # prefix sums: every window in O(n)
        prefix.append(prefix[-1] + c)
    return [(prefix[i + window] - prefix[i]) / window for i in range(len(confs) - window + 1)]


def lowest_group_confidence(confs: Sequence[float], window: int = DEFAULT_WINDOW) -> float | None:
    groups = group_confidences(confs, window)
    return min(groups) if groups else None


def tail_confidence(confs: Sequence[float], tail: int = DEFAULT_TAIL) -> float | None:
    """Mean C_i over the last `tail` tokens (all of them when fewer)."""
    if tail < 1:
        raise ValueError("tail must be at least 1")
    return _mean(confs[-tail:])


def mean_token_confidence(confs: Sequence[float]) -> float | None:
    return _mean(confs)


@dataclass(frozen=True)
class Signals:
    """One round's confidence signals; None where the round produced no tokens."""

    entropy_confidence: float | None
    mean_token_confidence: float | None
    lowest_group_confidence: float | None
    tail_confidence: float | None
    n_tokens: int
    stable_rounds: int = 0  # rounds, this one included, that ended on the same extracted answer
    # Whether the round stated a final answer; None where none is expected (a thinking segment). A
    # round that should answer and did not is never confident, however sure its tokens were.
    has_answer: bool | None = None

    @classmethod
    def of_confidence(cls, confidence: float | None) -> Signals:
        """Signals carrying only an entropy confidence (callers that have nothing more)."""
        return cls(confidence, None, None, None, 0)

    @classmethod
    def compute(
        cls,
        logprobs: Sequence[TopLogprobs],
        vocab_size: int,
        *,
        window: int = DEFAULT_WINDOW,
        tail: int = DEFAULT_TAIL,
    ) -> Signals:
        confs = token_confidences(logprobs)
        return cls(
            entropy_confidence=mean_confidence(logprobs, vocab_size),
            mean_token_confidence=mean_token_confidence(confs),
            lowest_group_confidence=lowest_group_confidence(confs, window),
            tail_confidence=tail_confidence(confs, tail),
            n_tokens=len(confs),
        )


_MARKER = re.compile(re.escape(ANSWER_MARKER), re.IGNORECASE)
# A whole number token: plain digits or properly comma-grouped thousands, optional sign and decimals.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _normalise_number(token: str) -> str:
    if not _NUMBER.fullmatch(token):
        return token
    token = token.replace(",", "").lstrip("+")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    return "0" if token in ("-0", "") else token


def normalise_answer(answer: str) -> str:
    """Lowercase, single spaces, no trailing period or markdown emphasis, canonical numbers."""
    s = " ".join(answer.lower().split()).strip("*_ ").rstrip(".").strip()
    return " ".join(_normalise_number(t) for t in s.split())


def extract_answer(text: str) -> str | None:
    """The normalised first line after the last "Final answer:" marker; None without one or if empty."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip().lstrip("*_").strip()  # "**Final answer:** 42"
    answer = normalise_answer(rest.splitlines()[0]) if rest else ""
    return answer or None


def stable_rounds(answers: Sequence[str | None]) -> int:
    """How many of the most recent rounds end on the same non-None answer."""
    if not answers or answers[-1] is None:
        return 0
    n = 0
    for a in reversed(answers):
        if a != answers[-1]:
            break
        n += 1
    return n


def _check(name: str, value: float | None, minimum: float) -> tuple[bool, str]:
    if value is None:
        return False, f"{name} n/a < {minimum:g}"
    ok = value >= minimum
    return ok, f"{name} {value:.3f} {'>=' if ok else '<'} {minimum:g}"


class ExitRule(BaseModel):
    """When a round may end the loop early, by its signals; one rule per tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_entropy_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="Normalised-entropy confidence (confidence.py) at least this."
    )
    min_lowest_group_confidence: float | None = Field(
        None, ge=0.0, description="DeepConf lowest sliding-window group confidence at least this."
    )
    min_tail_confidence: float | None = Field(
        None, ge=0.0, description="DeepConf mean confidence of the round's last tokens at least this."
    )
    stable_for: int | None = Field(
        None, ge=2, description="The same extracted answer in at least this many most recent rounds."
    )
    mode: Literal["all", "any"] = Field(
        "all", description="all: every configured criterion must hold; any: one is enough."
    )

    @property
    def configured(self) -> bool:
        return any(
            v is not None
            for v in (
                self.min_entropy_confidence,
                self.min_lowest_group_confidence,
                self.min_tail_confidence,
                self.stable_for,
            )
        )

    def _confidence_checks(self, signals: Signals) -> list[tuple[bool, str]]:
        criteria = (
            ("entropy_confidence", self.min_entropy_confidence, signals.entropy_confidence),
            ("lowest_group_confidence", self.min_lowest_group_confidence, signals.lowest_group_confidence),
            ("tail_confidence", self.min_tail_confidence, signals.tail_confidence),
        )
        return [_check(name, value, minimum) for name, minimum, value in criteria if minimum is not None]

    def confident(self, signals: Signals) -> bool:
        """Whether a configured confidence criterion held (not the stable-answers one)."""
        return any(ok for ok, _ in self._confidence_checks(signals))

    def satisfied(self, signals: Signals, stable_rounds: int) -> tuple[bool, list[str]]:
        """Whether the rule holds, and each configured criterion as a short held/failed string.

        Unconfigured criteria are ignored; a rule with none configured never holds.
        """
        checks = self._confidence_checks(signals)
        if self.stable_for is not None:
            ok = stable_rounds >= self.stable_for
            checks.append((ok, f"stable_rounds {stable_rounds} {'>=' if ok else '<'} {self.stable_for}"))
        if not checks:
            return False, []
        combine = all if self.mode == "all" else any
        return combine(ok for ok, _ in checks), [msg for _, msg in checks]
