"""An explainable prompt-complexity scorer that picks a reasoning tier (pure).

Each feature is a small count over the prompt text; the score is a weighted sum of the capped counts,
and two thresholds cut it into low / medium / high. Critical domains (legal, financial, medical) are
not a matter of degree: enough distinct keywords from one domain make the prompt critical whatever its
score, because the cost of a wrong answer there, not the difficulty, is what calls for full
verification. Every number behind a decision is returned, so a routing choice can be explained.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

FEATURES = ("words", "questions", "constraints", "planning", "numbers", "arithmetic", "code")
_LABELS = {
    "words": "word",
    "questions": "question",
    "constraints": "constraint",
    "planning": "planning marker",
    "numbers": "number",
    "arithmetic": "arithmetic op",
    "code": "code marker",
}
# An operator between two operands (digits, single-letter variables, parentheses). The right operand
# is a lookahead so chains like "2 + 3 * 4" count each operator.
_ARITHMETIC = re.compile(r"(?:\d|\b[a-z]\b|\))\s*[-+*/×÷^=]\s*(?=\d|\b[a-z]\b|\()", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
# Symbols that are rare in prose but common in code; fences count once per ``` pair.
_CODE_SYMBOLS = re.compile(r"[{};]")
_FENCE = "```"


def keyword_pattern(keywords: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive, word-bounded alternation; a plural s/es suffix matches too."""
    alts = sorted({k.strip().lower() for k in keywords if k.strip()}, key=len, reverse=True)
    if not alts:
        return None
    body = "|".join(r"\s+".join(re.escape(w) for w in a.split()) for a in alts)
    return re.compile(rf"\b(?:{body})(?:s|es)?\b", re.IGNORECASE)


def _matches(pattern: re.Pattern[str] | None, text: str) -> list[str]:
    return [] if pattern is None else [m.group(0).lower() for m in pattern.finditer(text)]


def count_words(text: str) -> float:
    return float(len(text.split()))


def count_questions(text: str) -> float:
    return float(text.count("?"))


def count_keywords(text: str, pattern: re.Pattern[str] | None) -> float:
    return float(len(_matches(pattern, text)))


def count_numbers(text: str) -> float:
    return float(len(_NUMBER.findall(text)))


def count_arithmetic(text: str) -> float:
    return float(len(_ARITHMETIC.findall(text)))


def count_code(text: str, pattern: re.Pattern[str] | None) -> float:
    return float(text.count(_FENCE) // 2 + len(_CODE_SYMBOLS.findall(text)) + len(_matches(pattern, text)))


class FeatureWeight(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(ge=0.0, description="Score added per unit of the feature.")
    cap: float = Field(gt=0.0, description="Feature value beyond which the score stops growing.")


def _fw(weight: float, cap: float) -> FeatureWeight:
    return FeatureWeight(weight=weight, cap=cap)


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    medium: float = Field(1.5, gt=0.0, description="Scores at or above this are at least medium.")
    high: float = Field(5.0, gt=0.0, description="Scores at or above this are high.")

    @model_validator(mode="after")
    def _increasing(self) -> Thresholds:
        if not self.medium < self.high:
            raise ValueError(f"thresholds must increase: medium {self.medium} >= high {self.high}")
        return self


_DEFAULT_WEIGHTS = {
    "words": _fw(0.02, 300),
    "questions": _fw(0.5, 6),
    "constraints": _fw(0.5, 8),
    "planning": _fw(0.75, 8),
    "numbers": _fw(0.25, 8),
    "arithmetic": _fw(1.0, 4),
    "code": _fw(0.5, 6),
}
_DEFAULT_CONSTRAINTS = [
    "must", "should", "at least", "at most", "exactly", "without", "only", "ensure", "each", "every",
    "all", "no more than", "no less than", "cannot", "must not", "required", "constraint",
]  # fmt: skip
_DEFAULT_PLANNING = [
    "then", "after that", "step", "plan", "schedule", "first", "next", "finally", "compare", "optimize",
    "optimise", "design", "trade-off", "tradeoff", "prioritize", "allocate", "strategy",
]  # fmt: skip
_DEFAULT_CODE = ["def", "class", "function", "select", "return", "import", "lambda"]
_DEFAULT_DOMAINS = {
    "legal": ["contract", "liability", "clause", "lawsuit", "litigation", "statute", "indemnity",
              "plaintiff", "defendant", "attorney", "lawyer", "legal", "court", "breach"],
    "financial": ["invest", "investment", "tax", "portfolio", "loan", "audit", "mortgage", "dividend",
                  "securities", "interest rate", "retirement", "credit", "bankruptcy"],
    "medical": ["diagnosis", "dosage", "dose", "symptom", "treatment", "patient", "medication",
                "prescription", "drug", "disease", "surgery", "side effect", "contraindication"],
}  # fmt: skip


class RoutingCalibration(BaseModel):
    """Where fitted weights came from (`ponder calibrate --routing`): they apply to this model only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="The model whose outcomes the weights were fitted to.")
    at: str = Field(description="Date of the fit (YYYY-MM-DD).")
    dataset: list[str] = Field(description="Problem families (dataset:difficulty) and formats fitted on.")
    seed: int = Field(description="Problem generator and held-out split seed.")
    prompts: int = Field(ge=1, description="Calibration prompts (problems x formats).")
    labels: dict[str, int] = Field(
        description="Prompts per label: the cheapest tier reaching the best answer."
    )
    held_out: int = Field(ge=0, description="Prompts held out of the fit.")
    held_out_accuracy: float = Field(ge=0, le=1, description="Fitted scorer picks the label's tier.")
    hand_held_out_accuracy: float = Field(ge=0, le=1, description="The hand-set scorer, same prompts.")
    majority_held_out_accuracy: float = Field(ge=0, le=1, description="Always the commonest label.")


class ComplexityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, FeatureWeight] = Field(
        default_factory=lambda: dict(_DEFAULT_WEIGHTS),
        description=f"Feature -> weight and cap; exactly the features {FEATURES}.",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Score cut-offs.")
    constraint_keywords: list[str] = Field(
        default_factory=lambda: list(_DEFAULT_CONSTRAINTS), description="Words that add a constraint."
    )
    planning_keywords: list[str] = Field(
        default_factory=lambda: list(_DEFAULT_PLANNING), description="Multi-hop / planning markers."
    )
    code_keywords: list[str] = Field(
        default_factory=lambda: list(_DEFAULT_CODE), description="Code words (besides fences, { } ;)."
    )
    domains: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in _DEFAULT_DOMAINS.items()},
        description="Critical domain -> keywords; matched as whole words, plural s/es included.",
    )
    domain_min_hits: int = Field(
        2, ge=1, description="Distinct keywords of one domain that make a prompt critical."
    )
    calibration: RoutingCalibration | None = Field(
        None, description="Set when the weights and thresholds were fitted to a model's outcomes."
    )

    _patterns: dict[str, re.Pattern[str] | None] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _known_features(self) -> ComplexityConfig:
        missing = [f for f in FEATURES if f not in self.weights]
        unknown = [f for f in self.weights if f not in FEATURES]
        if missing or unknown:
            raise ValueError(f"weights must be exactly {FEATURES}; missing {missing}, unknown {unknown}")
        return self

    def model_post_init(self, _context: object) -> None:
        # Compiled once per config, not per prompt.
        self._patterns = {
            "constraints": keyword_pattern(self.constraint_keywords),
            "planning": keyword_pattern(self.planning_keywords),
            "code": keyword_pattern(self.code_keywords),
        } | {f"domain:{d}": keyword_pattern(kws) for d, kws in self.domains.items()}

    def pattern(self, name: str) -> re.Pattern[str] | None:
        return self._patterns[name]

    @classmethod
    def load(cls, path: str | Path) -> ComplexityConfig:
        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f) or {})

    def hand_set(self) -> ComplexityConfig:
        """This scorer with the hand-set weights and thresholds (keywords and domains kept), uncalibrated."""
        defaults = ComplexityConfig()
        return self.model_copy(
            update={"weights": defaults.weights, "thresholds": defaults.thresholds, "calibration": None}
        )

    def for_model(self, model: str | None) -> tuple[ComplexityConfig, list[str]]:
        """This scorer as it applies to the served `model`: weights fitted to another model's outcomes
        fall back to the hand-set defaults (keywords and domains kept), with a warning."""
        if model is None or self.calibration is None or self.calibration.model == model:
            return self, []
        return self.hand_set(), [
            f"the complexity scorer was fitted to {self.calibration.model!r}, not the served {model!r}: "
            "its hand-set weights route requests until `ponder calibrate --routing` runs with this model"
        ]


@dataclass(frozen=True)
class Assessment:
    tier: str
    score: float
    reason: str
    features: dict[str, float] = field(default_factory=dict)


def extract_features(text: str, cfg: ComplexityConfig) -> dict[str, float]:
    """Raw (uncapped) feature values, then distinct keyword hits per critical domain."""
    feats = {
        "words": count_words(text),
        "questions": count_questions(text),
        "constraints": count_keywords(text, cfg.pattern("constraints")),
        "planning": count_keywords(text, cfg.pattern("planning")),
        "numbers": count_numbers(text),
        "arithmetic": count_arithmetic(text),
        "code": count_code(text, cfg.pattern("code")),
    }
    for d in cfg.domains:
        feats[f"domain_{d}"] = float(len(domain_hits(text, cfg, d)))
    return feats


def domain_hits(text: str, cfg: ComplexityConfig, domain: str) -> list[str]:
    """Distinct keywords of `domain` in `text`, in order of first appearance."""
    return list(dict.fromkeys(_matches(cfg.pattern(f"domain:{domain}"), text)))


def contributions(feats: dict[str, float], cfg: ComplexityConfig) -> dict[str, float]:
    return {f: w.weight * min(feats[f], w.cap) for f, w in cfg.weights.items()}


def _describe(feats: dict[str, float], contrib: dict[str, float], top: int = 4) -> str:
    ranked = sorted((f for f in FEATURES if contrib[f] > 0), key=lambda f: -contrib[f])[:top]
    return ", ".join(f"{feats[f]:g} {_LABELS[f]}{'' if feats[f] == 1 else 's'}" for f in ranked)


def _critical(text: str, cfg: ComplexityConfig) -> tuple[str, list[str]] | None:
    """The domain with the most distinct hits at or above the minimum; ties go to config order."""
    best: tuple[str, list[str]] | None = None
    for d in cfg.domains:
        hits = domain_hits(text, cfg, d)
        if len(hits) >= cfg.domain_min_hits and (best is None or len(hits) > len(best[1])):
            best = (d, hits)
    return best


def score(text: str, cfg: ComplexityConfig) -> Assessment:
    """The tier for a prompt, the score behind it, and a one-line explanation."""
    feats = extract_features(text, cfg)
    contrib = contributions(feats, cfg)
    total = round(sum(contrib.values()), 6)
    crit = _critical(text, cfg)
    if crit is not None:
        return Assessment("critical", total, f"critical domain: {crit[0]} ({', '.join(crit[1])})", feats)
    th = cfg.thresholds
    if total >= th.high:
        tier, cmp = "high", f">= high threshold {th.high:g}"
    elif total >= th.medium:
        tier, cmp = "medium", f">= medium threshold {th.medium:g}"
    else:
        tier, cmp = "low", f"< medium threshold {th.medium:g}"
    detail = _describe(feats, contrib)
    return Assessment(tier, total, f"score {total:.2f}{f' ({detail})' if detail else ''} {cmp}", feats)


def pick_tier(requested: str | None, text: str, cfg: ComplexityConfig) -> tuple[str, str]:
    """The tier a request runs at and why: the one it names, else the one its prompt scores."""
    if requested is not None:
        return requested, "requested"
    assessment = score(text, cfg)
    return assessment.tier, assessment.reason
