"""Benchmark problems from reasoning-gym (offline generators with their own answer checkers).

Problems are generated, not downloaded: a dataset name, its config and a seed fix every question, so a
benchmark run is reproducible from its JSON. Answers are scored by the dataset's own `score_answer`
(full credit only), never by a checker of ours.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.reasoning.signals import extract_answer

_BOXED = re.compile(r"\\boxed\{(.*)\}")  # LaTeX \boxed{98} -> 98
Checker = Callable[[str | None, dict[str, Any]], float]


@dataclass(frozen=True)
class Source:
    """One dataset at one difficulty; `tier` is the tier the bench runs its problems at."""

    dataset: str
    config: Mapping[str, Any]
    difficulty: str
    size: int | None = None  # problems to draw when load_problems is given no total
    tier: str | None = None


@dataclass(frozen=True)
class Problem:
    id: str
    dataset: str
    difficulty: str
    question: str
    answer: str
    entry: dict[str, Any] = field(repr=False, compare=False)
    tier: str | None = None
    checker: Checker | None = field(default=None, repr=False, compare=False)


def _two(min_digits: int, max_digits: int) -> dict[str, int]:
    """Two operands of min..max digits each."""
    return {"min_terms": 2, "max_terms": 2, "min_digits": min_digits, "max_digits": max_digits}


# Graded arithmetic for Qwen2.5-Coder-0.5B. Accuracy of one greedy round, 20 problems per level
# (2026-11-24): chain_sum 2x2 digits 0.9 (it fails on negative results, so draws vary: 0.25-0.9),
# products 1-2 digits 0.65, 2x2 digits 0.55, 2-3 digits 0.15. Each level's tier is the tier the
# bench runs it at ("difficulty" tiers, docs/benchmarks.md): harder problems get more rounds.
GRADED: tuple[Source, ...] = (
    Source("chain_sum", _two(2, 2), "easy", tier="low"),
    Source("products", _two(1, 2), "medium", tier="medium"),
    Source("products", _two(2, 2), "hard", tier="high"),
    Source("products", _two(2, 3), "hardest", tier="high"),
)
SUITES: dict[str, tuple[Source, ...]] = {"graded": GRADED}


def sources(spec: str | Sequence[Source]) -> list[Source]:
    if not isinstance(spec, str):
        return list(spec)
    if spec not in SUITES:
        raise ValueError(f"unknown problem suite {spec!r}; use one of {', '.join(SUITES)}")
    return list(SUITES[spec])


def _counts(srcs: Sequence[Source], n: int | None) -> list[int]:
    """Problems per source: each one's size without a total, else n split evenly (earlier first)."""
    if n is None:
        if any(s.size is None for s in srcs):
            raise ValueError("give a number of problems, or a size for every source")
        return [int(s.size or 0) for s in srcs]
    base, extra = divmod(n, len(srcs))
    return [base + (i < extra) for i in range(len(srcs))]


def source_seed(seed: int, index: int, src: Source) -> int:
    """A seed per source, far from the others': reasoning-gym seeds item j with `seed + j`, so
    sources seeded seed, seed+1, ... would share items shifted by one (94 + 57, then 94 + 57 - 98)."""
    return zlib.crc32(f"{seed}:{index}:{src.dataset}:{src.difficulty}".encode())


def load_problems(spec: str | Sequence[Source], n: int | None = None, seed: int = 0) -> list[Problem]:
    """`n` problems (None: each source's size) from a named suite or a list of sources, interleaved
    across sources so any prefix of the list covers every difficulty. Deterministic in `seed`."""
    import reasoning_gym  # ~1.5 s to import: not at CLI start-up

    srcs = sources(spec)
    if not srcs:
        raise ValueError("no problem sources")
    per_source: list[list[Problem]] = []
    for i, (src, count) in enumerate(zip(srcs, _counts(srcs, n), strict=True)):
        if count == 0:
            per_source.append([])
            continue
        ds = reasoning_gym.create_dataset(
            src.dataset, size=count, seed=source_seed(seed, i, src), **dict(src.config)
        )
        per_source.append(
            [
                Problem(
                    id=f"{src.difficulty}-{src.dataset}-{seed}-{j}",
                    dataset=src.dataset,
                    difficulty=src.difficulty,
                    question=entry["question"],
                    answer=str(entry["answer"]),
                    entry=entry,
                    tier=src.tier,
                    checker=ds.score_answer,
                )
                for j, entry in enumerate(ds)
            ]
        )
    longest = max(len(p) for p in per_source)
    return [ps[j] for j in range(longest) for ps in per_source if j < len(ps)]


def warmup_problems(warmup: Sequence[Any], n: int | None, seed: int) -> list[Problem]:
    """A domain's warm-up problems (configs/domains.yaml `warmup`: dataset, config, size each);
    every dataset's size when `n` is None."""
    sources = [Source(w.dataset, w.config, f"{w.dataset}{i}", size=w.size) for i, w in enumerate(warmup)]
    return load_problems(sources, n, seed)


def answer_line(text: str) -> str | None:
    """The raw line after the last "Final answer:" marker, markdown and a final period removed,
    case kept (some checkers compare exactly: syllogism wants "Yes", not "yes")."""
    pos = text.lower().rfind("final answer:")
    if pos < 0:
        return None
    rest = text[pos + len("final answer:") :].strip()
    line = rest.splitlines()[0] if rest else ""
    while True:  # "**146**." -> "146": peel markdown, math and a final period until nothing changes
        peeled = _BOXED.sub(r"\1", line).strip().strip("*_`$").removeprefix("\\(").removesuffix("\\)")
        peeled = peeled.rstrip(".")
        if peeled == line:
            return line or None
        line = peeled


def candidates(text: str) -> list[str]:
    """Answer strings to offer the checker: the raw line, the normalised one (signals.py), and what
    follows the line's last "=" ("Final answer: 48 - 85 = -37" states -37)."""
    line = answer_line(text)
    after_eq = line.rsplit("=", 1)[1].strip() if line and "=" in line else None
    out = [line, extract_answer(text), after_eq]
    if after_eq:
        out.append(extract_answer(f"final answer: {after_eq}"))
    return list(dict.fromkeys(a for a in out if a))


def score(problem: Problem, text: str) -> bool:
    """Whether the round text's final answer is right, by the dataset's own checker (full credit)."""
    if problem.checker is None:
        import reasoning_gym

        check: Checker = reasoning_gym.get_score_answer_fn(problem.dataset)
    else:
        check = problem.checker
    return any(math.isclose(check(a, problem.entry), 1.0) for a in candidates(text))
