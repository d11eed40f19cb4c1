"""Per-domain confidence-exit thresholds: the registry, domain detection, and calibration (pure).

A threshold is on a round's entropy confidence (services/reasoning/confidence.py, in [0, 1]); a
round at or above it may end the loop once the tier's min_rounds have run. What a confidence is worth
differs by domain (a model can be fluently wrong about law and hesitantly right about sums), so each
domain has its own threshold, set offline by `calibrate` and only ever raised online.

Calibration is DeepConf's percentile method (Fu et al., "Deep Think with Confidence": the offline
threshold is a percentile of the confidences seen on warm-up problems) adapted from sampled traces to
round exits: warm-up problems run to the tier's ceiling, every exit threshold is simulated on those
traces, and the lowest threshold that keeps the ceiling's accuracy (within a tolerance) wins, since
the lowest threshold exits earliest and so saves the most tokens.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from services.reasoning.complexity import keyword_pattern
from services.reasoning.tiers import TIER_NAMES

CONFIDENCE_EXIT = "confidence"  # tiers.Reason.CONFIDENCE: the exit reason online feedback looks at
# Scalars and flat lists: what reasoning-gym dataset configs take (digits, term counts, operators).
ConfigValue = int | float | str | bool | list[int | float | str]

HEADER = """\
# Per-domain confidence-exit thresholds (services/reasoning/domains.py).
# threshold: exit once a round's entropy confidence (services/reasoning/confidence.py, in [0, 1])
#   reaches it, after the tier's min_rounds; null = never exit on confidence in this domain.
#   A request's own confidence_threshold wins over its domain's, which wins over its tier's.
# keywords: whole words, plural s/es included; the domain with the most distinct hits (at least
#   min_hits) is a prompt's domain, else default_domain; ties go to the domain listed first.
# warmup: reasoning-gym datasets that `ponder calibrate --domain D` runs to the ceiling of `tier`;
#   calibrate rewrites this file (threshold + calibration block), keeping this header only, so keep
#   notes here, not beside the values.
# tot: whether Tree-of-Thought beat a chain of the tier's ceiling on the warm-up problems, written
#   by `ponder calibrate --tot --domain D`; only then does a request that did not ask for ToT get it.
#   calibration and tot name their model: another served model ignores them (with a warning).
# Online feedback (POST feedback) may only raise a threshold (domains.online_threshold).
"""


class Warmup(BaseModel):
    """A reasoning-gym dataset to calibrate a domain on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(min_length=1, description="reasoning-gym dataset name, e.g. chain_sum.")
    size: int = Field(ge=1, le=10_000, description="Problems drawn from it.")
    config: dict[str, ConfigValue] = Field(
        default_factory=dict, description="Keyword arguments of reasoning_gym.create_dataset."
    )


class Calibration(BaseModel):
    """What the last `ponder calibrate` measured; written by it, read by depth control."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float | None = Field(ge=0.0, le=1.0, description="Chosen threshold; null = never exit.")
    n_problems: int = Field(ge=0, description="Warm-up problems (traces) behind it.")
    accuracy_ceiling: float = Field(
        ge=0.0, le=1.0, description="Accuracy running every problem to the ceiling."
    )
    accuracy_exit: float = Field(ge=0.0, le=1.0, description="Accuracy with the chosen threshold.")
    token_saving_fraction: float = Field(
        ge=0.0, le=1.0, description="1 - completion tokens with the threshold / tokens at the ceiling."
    )
    model: str = Field(description="Model the traces came from: thresholds do not transfer across models.")
    at: str = Field(description="ISO date of the calibration.")


class TotEvidence(BaseModel):
    """Whether Tree-of-Thought beat a chain of the same token cost on this domain's problems: the only
    thing that lets a request that did not ask for ToT get it (services/reasoning/planning.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pays: bool = Field(description="ToT's accuracy beat the chain's at no more tokens.")
    accuracy_tot: float = Field(ge=0.0, le=1.0)
    accuracy_chain: float = Field(ge=0.0, le=1.0, description="A chain spending ToT's tokens, or fewer.")
    tokens_tot: float = Field(ge=0.0, description="Mean completion tokens per problem.")
    tokens_chain: float = Field(ge=0.0)
    n_problems: int = Field(ge=1)
    model: str = Field(description="Model the runs came from: evidence does not transfer across models.")
    at: str = Field(description="ISO date of the measurement.")

    def reason(self, domain: str) -> str:
        verdict = "beat" if self.pays else "did not beat"
        return (
            f"Tree-of-Thought {verdict} a chain on {domain} ({self.accuracy_tot:.2f} vs "
            f"{self.accuracy_chain:.2f} accuracy, {self.tokens_tot:.0f} vs {self.tokens_chain:.0f} tokens, "
            f"{self.n_problems} problems, {self.model})"
        )


class Domain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field("", description="What prompts belong here.")
    keywords: list[str] = Field(default_factory=list, description="Words that put a prompt in this domain.")
    threshold: float | None = Field(
        ge=0.0, le=1.0, description="Entropy-confidence exit threshold; null = never exit on confidence."
    )
    tier: str = Field("medium", description="Tier whose ceiling calibration runs warm-up problems to.")
    warmup: list[Warmup] = Field(default_factory=list, description="Calibration datasets; empty = none.")
    calibration: Calibration | None = Field(None, description="Written by `ponder calibrate`.")
    tot: TotEvidence | None = Field(
        None, description="Evidence that Tree-of-Thought pays here; without it tiers that use ToT run chains."
    )

    @field_validator("tier")
    @classmethod
    def _known_tier(cls, tier: str) -> str:
        if tier not in TIER_NAMES:
            raise ValueError(f"unknown tier {tier!r}; use one of {', '.join(TIER_NAMES)}")
        return tier


class DomainRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_domain: str = Field("general", description="Domain of prompts that match no keywords.")
    min_hits: int = Field(1, ge=1, description="Distinct keywords of one domain needed to pick it.")
    domains: dict[str, Domain] = Field(description="Domain name -> keywords, threshold, warm-ups.")

    _patterns: dict[str, re.Pattern[str] | None] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _default_exists(self) -> DomainRegistry:
        if self.default_domain not in self.domains:
            raise ValueError(f"default_domain {self.default_domain!r} is not a domain")
        return self

    def model_post_init(self, _context: object) -> None:
        self._patterns = {name: keyword_pattern(d.keywords) for name, d in self.domains.items()}

    def pattern(self, domain: str) -> re.Pattern[str] | None:
        return self._patterns[domain]

    def threshold_for(
        self, domain: str | None, overrides: Mapping[str, float | None] | None = None
    ) -> float | None:
        """A domain's threshold: a live override (online feedback, operator) wins over the file.
        An unknown or missing domain gets the default domain's."""
        name = domain if domain in self.domains else self.default_domain
        if overrides and name in overrides:
            return overrides[name]
        return self.domains[name].threshold

    @classmethod
    def load(cls, path: str | Path) -> DomainRegistry:
        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f))

    def for_model(self, model: str | None) -> tuple[DomainRegistry, list[str]]:
        """This registry as it applies to the served `model`, and a warning per measurement taken
        with another model: such a calibrated threshold falls back to the tier's (thresholds do
        not transfer across models) and such ToT evidence is dropped. None: unchanged."""
        if model is None:
            return self, []
        domains, warnings = dict(self.domains), []
        for name, d in self.domains.items():
            update: dict[str, object] = {}
            if d.calibration is not None and d.calibration.model != model:
                update["threshold"] = None
                warnings.append(
                    f"domain {name!r} was calibrated with {d.calibration.model!r}, not the served {model!r}: "
                    "its threshold falls back to the tier's until `ponder calibrate` runs with this model"
                )
            if d.tot is not None and d.tot.model != model:
                update["tot"] = None
                warnings.append(
                    f"domain {name!r}: its Tree-of-Thought evidence came from {d.tot.model!r}, not the "
                    f"served {model!r}: ignored (its tiers run chains)"
                )
            if update:
                domains[name] = d.model_copy(update=update)
        if not warnings:
            return self, []
        return self.model_copy(update={"domains": domains}), warnings


def detect_domain(text: str, registry: DomainRegistry) -> tuple[str, str]:
    """The prompt's domain and why: the most distinct keyword hits (ties: file order), else default."""
    best: tuple[str, list[str]] | None = None
    for name in registry.domains:
        pattern = registry.pattern(name)
        found = [] if pattern is None else [m.group(0).lower() for m in pattern.finditer(text)]
        hits = list(dict.fromkeys(found))  # distinct, in order of first appearance
        if len(hits) >= registry.min_hits and (best is None or len(hits) > len(best[1])):
            best = (name, hits)
    if best is None:
        return registry.default_domain, "no domain keywords"
    return best[0], f"keywords: {', '.join(best[1])}"


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class TraceRound:
    """One round of a warm-up problem run to the ceiling."""

    confidence: float | None
    correct: bool  # this round's extracted final answer is right
    completion_tokens: int


Trace = Sequence[TraceRound]


@dataclass(frozen=True)
class Candidate:
    percentile: float | None  # None: the never-exit candidate
    threshold: float | None
    accuracy: float
    mean_tokens: float
    mean_rounds: float
    exit_rate: float  # share of problems that exited on confidence before the ceiling


@dataclass(frozen=True)
class CalibrationResult:
    threshold: float | None  # None: never exit (no candidate kept the ceiling's accuracy)
    accuracy_ceiling: float
    accuracy_exit: float
    token_saving_fraction: float
    n: int
    candidates: list[Candidate] = field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def exit_round(trace: Trace, threshold: float | None, min_rounds: int, max_rounds: int) -> int:
    """Rounds done when the loop ends: the first count r >= min_rounds whose round's confidence
    reaches the threshold, else the ceiling (or the trace's end, if it stopped short of it)."""
    last = min(max_rounds, len(trace))
    if threshold is not None:
        for r in range(min_rounds, last + 1):
            c = trace[r - 1].confidence
            if c is not None and c >= threshold:
                return r
    return last


def simulate(
    traces: Sequence[Trace], threshold: float | None, min_rounds: int, max_rounds: int
) -> tuple[float, float, float, float]:
    """(accuracy, mean completion tokens, mean rounds, confidence-exit rate) of a threshold."""
    correct = tokens = rounds = exits = 0
    for t in traces:
        r = exit_round(t, threshold, min_rounds, max_rounds)
        correct += t[r - 1].correct
        tokens += sum(x.completion_tokens for x in t[:r])
        rounds += r
        exits += r < min(max_rounds, len(t))
    n = len(traces)
    return correct / n, tokens / n, rounds / n, exits / n


def _candidate_thresholds(
    traces: Sequence[Trace], min_rounds: int, max_rounds: int, percentiles: Iterable[float]
) -> list[tuple[float, float]]:
    seen = [x.confidence for t in traces for x in t[min_rounds - 1 : max_rounds] if x.confidence is not None]
    if not seen:
        return []
    out: dict[float, float] = {}
    for q in percentiles:  # equal thresholds from different percentiles: keep the lowest percentile
        out.setdefault(percentile(seen, q), q)
    return sorted((t, q) for t, q in out.items())


def calibrate(
    traces: Sequence[Trace],
    *,
    min_rounds: int,
    max_rounds: int,
    tolerance: float = 0.01,
    percentiles: Iterable[float] = range(5, 100, 5),
) -> CalibrationResult:
    """The lowest candidate threshold whose simulated accuracy is at least the ceiling's minus
    `tolerance` (fractions, not points). Candidates are the given percentiles of the confidences of
    rounds that may exit (count >= min_rounds), plus never-exit, which always qualifies."""
    if not traces or any(len(t) == 0 for t in traces):
        raise ValueError("calibration needs at least one trace, each with at least one round")
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds; got {min_rounds}, {max_rounds}")
    ceiling_acc, ceiling_tokens, ceiling_rounds, _ = simulate(traces, None, min_rounds, max_rounds)
    candidates = [Candidate(None, None, ceiling_acc, ceiling_tokens, ceiling_rounds, 0.0)]
    for threshold, q in _candidate_thresholds(traces, min_rounds, max_rounds, percentiles):
        candidates.append(Candidate(q, threshold, *simulate(traces, threshold, min_rounds, max_rounds)))
    # 1e-9: accuracies are ratios of small counts; 0.7 - 0.1 must not fail against 0.6.
    ok = [c for c in candidates[1:] if c.accuracy >= ceiling_acc - tolerance - 1e-9]
    best = ok[0] if ok else candidates[0]  # candidates are sorted by threshold: ok[0] is the lowest
    saving = 1.0 - best.mean_tokens / ceiling_tokens if ceiling_tokens > 0 else 0.0
    return CalibrationResult(best.threshold, ceiling_acc, best.accuracy, saving, len(traces), candidates)


def online_threshold(
    current: float,
    feedback: Sequence[tuple[float | None, str, bool]],
    *,
    target_accuracy: float,
    tolerance: float = 0.01,
    step: float = 0.02,
    min_samples: int = 20,
    cap: float = 0.99,
) -> float:
    """The threshold after online feedback: raised by `step` (never above `cap`) when the requests
    that exited on confidence are less accurate than `target_accuracy - tolerance`, else unchanged.

    `feedback` holds recent (confidence, exit_reason, correct) rows; only confidence exits count
    (ceiling exits say nothing about the threshold), and fewer than `min_samples` of them change
    nothing. The threshold is never lowered here: feedback only samples rounds *above* the current
    threshold, so it cannot vouch for the less confident rounds a lower one would let exit. Only
    calibration, which sees whole traces to the ceiling, lowers a threshold.
    """
    exits = [correct for _, reason, correct in feedback if str(reason) == CONFIDENCE_EXIT]
    if len(exits) < min_samples:
        return current
    accuracy = sum(exits) / len(exits)
    if accuracy < target_accuracy - tolerance:
        return max(current, min(cap, round(current + step, 6)))
    return current


def save_calibration(
    path: str | Path, domain: str, result: CalibrationResult, model: str, *, at: str | None = None
) -> DomainRegistry:
    """Write the domain's new threshold and calibration block to the registry file, atomically.

    The file is re-dumped from the validated registry, so only the fixed header comment survives."""
    path = Path(path)
    registry = DomainRegistry.load(path)
    if domain not in registry.domains:
        raise ValueError(f"unknown domain {domain!r}")
    block = Calibration(
        threshold=result.threshold,
        n_problems=result.n,
        accuracy_ceiling=round(result.accuracy_ceiling, 4),
        accuracy_exit=round(result.accuracy_exit, 4),
        token_saving_fraction=round(result.token_saving_fraction, 4),
        model=model,
        at=at or dt.date.today().isoformat(),
    )
    threshold = None if result.threshold is None else round(result.threshold, 4)
    domains = dict(registry.domains)
    domains[domain] = domains[domain].model_copy(
        update={"threshold": threshold, "calibration": block.model_copy(update={"threshold": threshold})}
    )
    new = DomainRegistry.model_validate(registry.model_copy(update={"domains": domains}).model_dump())
    write_atomic(path, dump(new))
    return new


def tot_evidence(
    tot: Sequence[tuple[bool, int]], chain: Sequence[tuple[bool, int]], model: str, *, at: str | None = None
) -> TotEvidence:
    """Evidence from the same problems run both ways: (correct, completion tokens) per problem.

    ToT pays when it answers more problems right than the chain, or as many with fewer tokens: the
    chain runs the tier's ceiling, the most a chain of that tier may spend."""
    if not tot or len(tot) != len(chain):
        raise ValueError(f"need the same problems both ways; got {len(tot)} ToT and {len(chain)} chain runs")
    n = len(tot)
    acc_tot, acc_chain = sum(c for c, _ in tot) / n, sum(c for c, _ in chain) / n
    tok_tot, tok_chain = sum(t for _, t in tot) / n, sum(t for _, t in chain) / n
    pays = acc_tot > acc_chain or (acc_tot == acc_chain and tok_tot < tok_chain)
    return TotEvidence(
        pays=pays,
        accuracy_tot=round(acc_tot, 4),
        accuracy_chain=round(acc_chain, 4),
        tokens_tot=round(tok_tot, 1),
        tokens_chain=round(tok_chain, 1),
        n_problems=n,
        model=model,
        at=at or dt.date.today().isoformat(),
    )


def save_tot_evidence(path: str | Path, domain: str, evidence: TotEvidence) -> DomainRegistry:
    """Write the domain's Tree-of-Thought evidence to the registry file, atomically (as
    `save_calibration`: the file is re-dumped from the validated registry)."""
    path = Path(path)
    registry = DomainRegistry.load(path)
    if domain not in registry.domains:
        raise ValueError(f"unknown domain {domain!r}")
    domains = dict(registry.domains)
    domains[domain] = domains[domain].model_copy(update={"tot": evidence})
    new = DomainRegistry.model_validate(registry.model_copy(update={"domains": domains}).model_dump())
    write_atomic(path, dump(new))
    return new


def dump(registry: DomainRegistry) -> str:
    """The registry as the YAML file holds it: the header, then flow-style lists of scalars."""
    body = yaml.safe_dump(
        registry.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=1000
    )
    return HEADER + body


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one (tmp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
