"""Paired statistics for `ponder bench policy` (pure): 95% intervals for an accuracy, for a paired
difference of accuracies on the same prompts, and for a ratio of mean tokens; the non-inferiority
verdict. Every interval is two-sided 95%; the bootstrap is seeded, so a result is reproducible."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of 0.975


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float

    def as_dict(self, digits: int = 4) -> dict[str, float]:
        return {
            "value": round(self.value, digits),
            "lo": round(self.lo, digits),
            "hi": round(self.hi, digits),
        }


def wilson(right: int, n: int) -> Interval:
    """An accuracy's Wilson score interval (sane at 0 and n, unlike the normal one)."""
    if n <= 0:
        raise ValueError("an accuracy needs at least one prompt")
    p = right / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> Interval:
    """Accuracy of a minus accuracy of b on the same prompts: the mean of the per-prompt differences
    (-1, 0, 1) with its normal interval (n in the hundreds: the t and z quantiles agree to 0.01)."""
    if len(a) != len(b) or not a:
        raise ValueError("a paired comparison needs the same, non-empty set of prompts")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return Interval(mean, mean - Z95 * se, mean + Z95 * se)


def ratio_of_means(
    num: Sequence[float], den: Sequence[float], *, seed: int, resamples: int = 2000
) -> Interval:
    """mean(num) / mean(den) over the same prompts, with a paired percentile-bootstrap interval."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(x) != len(y) or not len(x) or y.sum() <= 0:
        raise ValueError("a token ratio needs the same prompts and a positive denominator")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    sums = y[idx].sum(axis=1)
    ratios = x[idx].sum(axis=1) / np.where(sums > 0, sums, np.nan)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return Interval(float(x.sum() / y.sum()), float(lo), float(hi))


def best_fixed(accuracy: Mapping[str, float], tokens: Mapping[str, float]) -> str:
    """The fixed policy with the best accuracy; of equals, the one spending fewer tokens."""
    if not accuracy:
        raise ValueError("no fixed policy to compare with")
    return min(accuracy, key=lambda k: (-accuracy[k], tokens[k], k))


@dataclass(frozen=True)
class Verdict:
    difference: Interval  # default minus the best fixed policy, as a fraction
    token_ratio: Interval  # default's mean tokens / the reference ceiling's
    non_inferior: bool  # the difference's lower bound is above -margin
    within_tokens: bool  # the ratio's point estimate is at most the bound
    margin: float
    token_bound: float

    def as_dict(self) -> dict:
        return {
            "difference": self.difference.as_dict(),
            "token_ratio": self.token_ratio.as_dict(),
            "non_inferior": self.non_inferior,
            "within_tokens": self.within_tokens,
            "margin": self.margin,
            "token_bound": self.token_bound,
        }


def verdict(
    default_right: Sequence[bool],
    best_right: Sequence[bool],
    default_tokens: Sequence[float],
    reference_tokens: Sequence[float],
    *,
    margin: float,
    token_bound: float,
    seed: int,
) -> Verdict:
    diff = paired_difference(default_right, best_right)
    ratio = ratio_of_means(default_tokens, reference_tokens, seed=seed)
    return Verdict(diff, ratio, diff.lo > -margin, ratio.value <= token_bound, margin, token_bound)
