"""`ponder calibrate --routing`: fit the complexity scorer to what tiers earn on a labelled problem set.

Problems from several reasoning-gym families and difficulties, each posed as a plain question and in
multiple-choice form (the same question with an options list: longer, more numbers, which the
hand-set scorer read as difficulty). Each prompt runs one greedy chain to the highest tier ceiling on
a real engine in this process (cluster/runner.py); its first k rounds are the k-round chain, so every
tier's outcome comes from the one run. services/reasoning/routing_fit.py labels each prompt with the
cheapest tier that reaches the best correctness, fits the scorer's weights and thresholds on most
problems and measures the fit on the rest. The result goes into the complexity file with a
calibration block naming the model (the router applies it to that model only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import random
import re
from pathlib import Path
from typing import Any

import yaml

from cluster.problems import Problem, Source, load_problems
from cluster.runner import Job, Runner, greedy, plan_for, settings_from_args
from services.reasoning.complexity import ComplexityConfig, RoutingCalibration
from services.reasoning.domains import write_atomic
from services.reasoning.routing_fit import TIERS, RoutingFit, Trace, depth_effects, fit_routing
from services.reasoning.tiers import TierTable

# Families at several difficulties: arithmetic, counting, dates, logic (yes/no), number theory.
ROUTING: tuple[Source, ...] = (
    Source("basic_arithmetic", {}, "basic"),
    Source("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}, "easy"),
    Source("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, "medium"),
    Source("products", {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}, "hard"),
    Source("leg_counting", {}, "counting"),
    Source("letter_counting", {}, "letters"),
    Source("gcd", {}, "gcd"),
    Source("syllogism", {}, "logic"),
    Source("calendar_arithmetic", {}, "dates"),
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
HEADER = """\
# Prompt-complexity scorer (services/reasoning/complexity.py): picks the tier in configs/tiers.yaml
# when a request names none. score = sum over features of weight * min(count, cap);
#   score < medium -> low;  medium <= score < high -> medium;  score >= high -> high.
# A prompt with at least domain_min_hits distinct keywords of one critical domain is critical.
# Weights and thresholds below were fitted by `ponder calibrate --routing` to the model named in
# `calibration` (docs/reasoning-control.md); another served model gets the hand-set defaults.
"""


def add_routing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--routing",
        action="store_true",
        help="fit the complexity scorer (tier routing) to outcomes instead of a domain's threshold",
    )
    p.add_argument("--held-out", type=float, default=0.3, help="--routing: fraction of problems held out")
    p.add_argument("--json", dest="json_path", help="--routing: write every prompt's trace and the fit here")


def _distractors(answer: str, rng: random.Random) -> list[str] | None:
    """Three wrong options like the answer, or None when there is no sensible set."""
    for pair in (("Yes", "No"), ("True", "False")):
        if answer in pair:
            return [pair[1 - pair.index(answer)]]
    if answer in WEEKDAYS:
        return rng.sample([d for d in WEEKDAYS if d != answer], 3)
    try:
        value = int(answer)
    except ValueError:
        return None
    offsets = rng.sample([-11, -10, -2, -1, 1, 2, 9, 10, 11], 3)
    return [str(value + o) for o in offsets]


_LETTER = re.compile(r"^\(?([A-D])\)?(?:[).:]\s*(.*))?$")


def _option_checker(options: list[str], check):
    """The dataset's checker, also taking an option's letter ("B", "(B)", "B) 42") for its value."""

    def checker(answer: str | None, entry: dict) -> float:
        m = _LETTER.match((answer or "").strip())
        if m is not None:
            answer = m.group(2) or options["ABCD".index(m.group(1))]
        return check(answer, entry)

    return checker


def multiple_choice(p: Problem, seed: int) -> Problem | None:
    """The same problem with a lettered options list; a letter or the value scores."""
    rng = random.Random(f"{seed}:{p.id}")
    wrong = _distractors(p.answer, rng)
    if wrong is None or p.checker is None:
        return None
    options = [p.answer, *wrong]
    rng.shuffle(options)
    listed = "\n".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(options))
    question = f"{p.question}\n\nOptions:\n{listed}"
    return dataclasses.replace(
        p, id=f"{p.id}-mc", question=question, checker=_option_checker(options, p.checker)
    )


def prompts(n: int, seed: int) -> list[Problem]:
    plain = load_problems(list(ROUTING), n, seed)
    mc = [m for p in plain if (m := multiple_choice(p, seed)) is not None]
    return plain + mc


async def _run(args: argparse.Namespace, settings: Any, problems: list[Problem], top: int) -> list[Trace]:
    table = TierTable.load(settings.tiers_file)
    plan = plan_for(table, "high", max_rounds=top, min_rounds=top)  # a chain to the ceiling, no exit
    jobs = [Job(p, "ceiling", plan, greedy(args.max_tokens), f"route-{p.id}") for p in problems]
    runner = Runner(settings.engine, settings.prompts)
    await runner.start()
    try:
        results = await runner.run_all(jobs, args.concurrency, desc="calibrate routing")
    finally:
        await runner.shutdown()
    return [
        Trace(
            p.question,
            tuple(r.correct for r in res.rounds),
            tuple(r.completion_tokens for r in res.rounds),
            p.id.removesuffix("-mc"),
            tuple(r.answer for r in res.rounds),
        )
        for p, res in zip(problems, results, strict=True)
    ]


def print_fit(fit: RoutingFit) -> None:
    print(f"\nlabels (cheapest tier reaching the best answer): {fit.labels}")
    print(f"fitted on {fit.train} prompts; held out {fit.held_out}")
    print(
        f"held-out tier agreement: fitted {fit.held_out_accuracy:.3f}, hand-set "
        f"{fit.hand_held_out_accuracy:.3f}, always the commonest label {fit.majority_held_out_accuracy:.3f}"
    )
    print(f"\n{'policy (held-out prompts)':28} {'accuracy':>9} {'tokens':>8}")
    for name, r in fit.policies.items():
        print(f"{name:28} {r.accuracy:9.3f} {r.mean_tokens:8.1f}")
    w = fit.config.weights
    print("\nfitted weights: " + ", ".join(f"{f} {w[f].weight:g}" for f in w))
    print(f"thresholds: medium {fit.config.thresholds.medium:g}, high {fit.config.thresholds.high:g}")


def save(path: str | Path, fit: RoutingFit, block: RoutingCalibration) -> None:
    cfg = fit.config.model_copy(update={"calibration": block})
    data = ComplexityConfig.model_validate(cfg.model_dump()).model_dump()
    write_atomic(
        Path(path), HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
    )


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    table = TierTable.load(settings.tiers_file)
    ceilings = {t: table.tiers[t].max_rounds for t in TIERS}
    problems = prompts(args.problems or 48, args.seed)
    traces = asyncio.run(_run(args, settings, problems, max(ceilings.values())))
    base = ComplexityConfig.load(settings.complexity_file)
    fit = fit_routing(traces, ceilings, base.hand_set(), seed=args.seed, held_out=args.held_out)
    print_fit(fit)
    effects = depth_effects(traces)
    print(f"\nround prompts: {settings.prompts.family!r}; what each later round did (share of prompts):")
    for k, e in effects.items():
        print(f"  {k}: changed {e['changed']:.3f}, fixed {e['fixed']:.3f}, broke {e['broke']:.3f}")
    block = RoutingCalibration(
        model=args.model,
        at=dt.date.today().isoformat(),
        dataset=[f"{s.dataset}:{s.difficulty}" for s in ROUTING] + ["formats: plain, multiple-choice"],
        seed=args.seed,
        prompts=len(traces),
        labels=fit.labels,
        held_out=fit.held_out,
        held_out_accuracy=round(fit.held_out_accuracy, 4),
        hand_held_out_accuracy=round(fit.hand_held_out_accuracy, 4),
        majority_held_out_accuracy=round(fit.majority_held_out_accuracy, 4),
    )
    if args.json_path:
        _write_json(
            args.json_path, traces, fit, block, {"prompts": settings.prompts.family, "rounds": effects}
        )
    if args.dry_run:
        print("dry run: nothing written")
    else:
        save(settings.complexity_file, fit, block)
        print(f"wrote the fitted scorer and its calibration to {settings.complexity_file}")
    return 0


def _write_json(
    path: str, traces: list[Trace], fit: RoutingFit, block: RoutingCalibration, depth: dict
) -> None:
    import json

    data = {
        "depth_effects": depth,
        "calibration": block.model_dump(),
        "policies": {k: dataclasses.asdict(v) for k, v in fit.policies.items()},
        "weights": {f: w.weight for f, w in fit.config.weights.items()},
        "thresholds": fit.config.thresholds.model_dump(),
        "traces": [dataclasses.asdict(t) for t in traces],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
