"""Tier routing learned from outcomes (pure): label each calibration prompt with the cheapest tier
that reaches the best correctness any tier reached on it, then fit the complexity scorer's own form to
those labels — a weighted sum of capped feature counts, cut by two thresholds — as an ordinal
(proportional-odds) logistic model with non-negative weights. The fitted weights stay explainable:
the scorer reports each feature's contribution as before.

A tier's outcome on a prompt is its chain run to the tier's ceiling: one greedy chain to the highest
ceiling gives them all, because a greedy chain of k rounds is the first k rounds of a longer one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.reasoning.complexity import (
    FEATURES,
    ComplexityConfig,
    FeatureWeight,
    Thresholds,
    extract_features,
    score,
)

TIERS = ("low", "medium", "high")  # ordered by cost; critical is a domain's call, not a score's
MAX_THRESHOLD = 1000.0  # "never": every prompt scores below it


@dataclass(frozen=True)
class Trace:
    """One prompt's greedy chain to the highest ceiling: per round, right or not, and its tokens."""

    text: str
    correct: tuple[bool, ...]
    tokens: tuple[int, ...]
    group: str  # prompts of one problem (its formats) stay on one side of the held-out split
    answers: tuple[str | None, ...] = ()  # each round's final answer, as extracted

    def at(self, rounds: int) -> tuple[bool, int]:
        """Correct, and completion tokens spent, for a chain of `rounds` (or all it ran)."""
        k = min(rounds, len(self.correct))
        return (self.correct[k - 1] if k else False), sum(self.tokens[:k])


def label(trace: Trace, ceilings: Mapping[str, int]) -> str:
    """The cheapest tier whose chain reaches the best correctness any tier reached on this prompt."""
    right = {t: trace.at(ceilings[t])[0] for t in TIERS}
    best = max(right.values())
    return next(t for t in TIERS if right[t] == best)


def capped(feats: Mapping[str, float], cfg: ComplexityConfig) -> np.ndarray:
    """Features scaled to [0, 1] by their caps (the scorer's cap is kept; only weights are fitted)."""
    return np.array([min(feats[f], cfg.weights[f].cap) / cfg.weights[f].cap for f in FEATURES])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def fit_ordinal(
    x: np.ndarray, y: np.ndarray, *, l2: float = 0.01, steps: int = 4000, lr: float = 0.5
) -> tuple[np.ndarray, float, float]:
    """Proportional-odds logistic regression, P(y <= k) = sigmoid(theta_k - x.w), fitted by full-batch
    projected gradient descent: w >= 0 (more of a feature never lowers the tier), theta_1 < theta_2.
    No randomness: the same data gives the same fit."""
    n, d = x.shape
    w, th = np.zeros(d), np.array([0.5, 1.5])
    for _ in range(steps):
        s = x @ w
        p1, p2 = _sigmoid(th[0] - s), _sigmoid(th[1] - s)
        # d(-log likelihood)/d(theta_k - s) per class; P(low)=p1, P(medium)=p2-p1, P(high)=1-p2
        mid = np.maximum(p2 - p1, 1e-12)
        g1 = np.where(y == 0, -(1 - p1), np.where(y == 1, p1 * (1 - p1) / mid, 0.0))
        g2 = np.where(y == 1, -p2 * (1 - p2) / mid, np.where(y == 2, p2, 0.0))
        grad_w = -(x.T @ (g1 + g2)) / n + l2 * w
        grad_th = np.array([g1.sum(), g2.sum()]) / n
        w = np.maximum(w - lr * grad_w, 0.0)
        th = th - lr * grad_th
        th[1] = max(th[1], th[0] + 1e-3)
    return w, float(th[0]), float(th[1])


def fitted_config(base: ComplexityConfig, w: np.ndarray, th1: float, th2: float) -> ComplexityConfig:
    """The scorer with the fitted weights (per unit of each feature, so `score` reads as before) and
    thresholds; everything else (caps, keywords, critical domains) from `base`."""
    weights = {
        f: FeatureWeight(weight=round(float(w[i]) / base.weights[f].cap, 6), cap=base.weights[f].cap)
        for i, f in enumerate(FEATURES)
    }
    medium = min(max(round(th1, 4), 1e-3), MAX_THRESHOLD - 1)
    high = min(max(round(th2, 4), medium + 1e-3), MAX_THRESHOLD)
    return base.model_copy(update={"weights": weights, "thresholds": Thresholds(medium=medium, high=high)})


def held_out_split(groups: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The groups held out of the fit: a seeded shuffle of the distinct groups, `fraction` of them."""
    distinct = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(distinct))
    k = max(1, round(fraction * len(distinct))) if len(distinct) > 1 else 0
    return {distinct[i] for i in order[:k]}


def routed_tier(text: str, cfg: ComplexityConfig) -> str:
    """The tier the scorer picks; a critical-domain prompt counts as high here (its own ceiling)."""
    tier = score(text, cfg).tier
    return tier if tier in TIERS else "high"


@dataclass(frozen=True)
class PolicyResult:
    accuracy: float
    mean_tokens: float


def evaluate(traces: Sequence[Trace], ceilings: Mapping[str, int], pick) -> PolicyResult:
    """Correctness and mean completion tokens when each prompt runs the tier `pick(trace)` returns."""
    if not traces:
        return PolicyResult(0.0, 0.0)
    outs = [t.at(ceilings[pick(t)]) for t in traces]
    return PolicyResult(sum(c for c, _ in outs) / len(outs), sum(k for _, k in outs) / len(outs))


@dataclass(frozen=True)
class RoutingFit:
    config: ComplexityConfig  # the scorer with the fitted weights and thresholds
    labels: dict[str, int]  # prompts per label, all of them
    train: int
    held_out: int
    held_out_accuracy: float  # the fitted scorer picks the label's tier
    hand_held_out_accuracy: float  # the scorer it replaces, on the same prompts
    majority_held_out_accuracy: float  # always the most common training label
    policies: dict[str, PolicyResult]  # on the held-out prompts: each fixed tier, hand, fitted


def fit_routing(
    traces: Sequence[Trace],
    ceilings: Mapping[str, int],
    base: ComplexityConfig,
    *,
    seed: int,
    held_out: float,
) -> RoutingFit:
    if len(traces) < 2:
        raise ValueError("need at least two calibration prompts")
    labels = [label(t, ceilings) for t in traces]
    out = held_out_split([t.group for t in traces], held_out, seed)
    train = [i for i, t in enumerate(traces) if t.group not in out]
    test = [i for i, t in enumerate(traces) if t.group in out]
    x = np.array([capped(extract_features(traces[i].text, base), base) for i in train])
    y = np.array([TIERS.index(labels[i]) for i in train])
    w, th1, th2 = fit_ordinal(x, y)
    fitted = fitted_config(base, w, th1, th2)
    majority = max(TIERS, key=lambda t: (sum(labels[i] == t for i in train), -TIERS.index(t)))

    def agree(cfg: ComplexityConfig | None) -> float:
        if not test:
            return 0.0
        hits = [(majority if cfg is None else routed_tier(traces[i].text, cfg)) == labels[i] for i in test]
        return sum(hits) / len(hits)

    held = [traces[i] for i in test]
    policies = {f"always {t}": evaluate(held, ceilings, lambda _, t=t: t) for t in TIERS}
    policies["hand-set scorer"] = evaluate(held, ceilings, lambda tr: routed_tier(tr.text, base))
    policies["fitted scorer"] = evaluate(held, ceilings, lambda tr: routed_tier(tr.text, fitted))
    return RoutingFit(
        config=fitted,
        labels={t: labels.count(t) for t in TIERS},
        train=len(train),
        held_out=len(test),
        held_out_accuracy=agree(fitted),
        hand_held_out_accuracy=agree(base),
        majority_held_out_accuracy=agree(None),
        policies=policies,
    )


def depth_effects(traces: Sequence[Trace]) -> dict[str, dict[str, float]]:
    """Per round k >= 2: the share of prompts whose answer round k changed, fixed (wrong -> right)
    and broke (right -> wrong): what the verification rounds did."""
    out: dict[str, dict[str, float]] = {}
    rounds = max((len(t.correct) for t in traces), default=0)
    for k in range(1, rounds):
        ts = [t for t in traces if len(t.correct) > k and len(t.answers) > k]
        if not ts:
            continue
        n = len(ts)
        out[f"round_{k + 1}"] = {
            "changed": round(sum(t.answers[k] != t.answers[k - 1] for t in ts) / n, 4),
            "fixed": round(sum(t.correct[k] and not t.correct[k - 1] for t in ts) / n, 4),
            "broke": round(sum(t.correct[k - 1] and not t.correct[k] for t in ts) / n, 4),
        }
    return out
