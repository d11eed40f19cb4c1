"""One request of a benchmark policy as a sample, and a policy's summary over its samples (shared by
`ponder bench tax` in both modes)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from cluster.runner import JobResult


@dataclass(frozen=True)
class Sample:
    correct: bool
    tokens: int
    latency_ms: float
    rounds: int


def of_result(r: JobResult) -> Sample:
    return Sample(r.correct, r.completion_tokens, r.latency_ms, len(r.rounds))


def metrics(samples: list[Sample]) -> dict[str, float]:
    lat = [s.latency_ms for s in samples]
    return {
        "n": len(samples),
        "accuracy": sum(s.correct for s in samples) / len(samples),
        "mean_tokens": statistics.fmean(s.tokens for s in samples),
        "mean_latency_ms": statistics.fmean(lat),
        "p50_latency_ms": statistics.median(lat),
        "mean_rounds": statistics.fmean(s.rounds for s in samples),
    }
