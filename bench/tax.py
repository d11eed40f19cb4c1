"""`ponder bench tax`: accuracy against the reasoning tax (tokens, latency) of each depth policy.

A real vLLM engine runs in this process with the router's Orchestrator (cluster/runner.py) on graded
reasoning-gym problems (cluster/problems.py), for these policies:
- fixed-k, k = 1..6: exactly k rounds (min = max = k, no confidence exit), greedy;
- tier-ceiling: each problem's tier run to its ceiling, no exit, greedy;
- confidence-exit: each problem's tier plan with the math domain's confidence threshold, greedy;
- tot: Tree-of-Thought (strategy "tot") on the high tier, depth <= 4, sampled (temperature 0.7,
  a fixed seed per problem: a tree needs diverse branches).

Cost trick (checked): rounds are deterministic given the prompt (greedy) and round k's prompt does not
depend on the ceiling, so a fixed-k run is the first k rounds of the fixed-6 run, and so is a
tier-ceiling run (fixed-k with k = the tier's ceiling). Fixed-6 runs once; the others are its
prefixes. Two real fixed-k runs check it (`prefix_check` in the JSON): batching can change float
rounding, and so a greedy token, so this is measured, not assumed.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from bench import write_json
from bench.samples import Sample, metrics, of_result
from cluster.problems import Problem, load_problems
from cluster.runner import (
    Job,
    JobResult,
    add_engine_arguments,
    default_model,
    engine_settings_note,
    greedy,
    plan_for,
    repo_path,
    run_jobs,
    settings_from_args,
    tot_sampling,
)
from services.reasoning.domains import DomainRegistry
from services.reasoning.tiers import RoundPlan, TierTable, decide

FIXED_MAX = 6
FIXED_TIER = "high"  # a tier whose ceiling allows FIXED_MAX rounds
TOT_TIER, TOT_DEPTH = "high", 4
EXIT_DOMAIN = "math"
PREFIX_CHECKS = ((0, 2), (1, 3))  # (problem index, k): real fixed-k runs against fixed-6 prefixes
GAIN_POINT = 0.01  # "one accuracy point", as a fraction


THINKING_CONFIG = repo_path("configs", "local-cpu-thinking.yaml")

COMMAND = ("tax", "accuracy vs tokens and latency of each depth policy (real engine)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from services.config import DEFAULT_CONFIG

    p.add_argument("--json", dest="json_path", required=True, help="write the results as JSON here")
    p.add_argument(
        "--model", help="model to run (default: qwen2.5-coder-0.5b-instruct if pulled, else SmolLM2)"
    )
    p.add_argument("--problems", type=int, default=40, help="problems (spread over the difficulty levels)")
    p.add_argument(
        "--mode",
        choices=["rounds", "thinking"],
        default="rounds",
        help="rounds: depth policies over rounds (draft, verify, ...); thinking: budgets and exits of one "
        "native thinking trace in segments (bench/tax_thinking.py)",
    )
    p.add_argument(
        "--config",
        help=f"app config YAML (tiers, domains, engine); default {Path(DEFAULT_CONFIG).name}, or "
        f"{Path(THINKING_CONFIG).name} with --mode thinking",
    )
    p.add_argument(
        "--max-tokens", type=int, default=256, help="most tokens per round (thinking mode: of the answer)"
    )
    p.add_argument("--segment-tokens", type=int, default=32, help="thinking mode: tokens per segment")
    p.add_argument(
        "--threshold", type=float, help="thinking mode: confidence-exit threshold (default: math's)"
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (the engine batches them)")
    p.add_argument("--plots", default=str(repo_path("bench", "results")), help="folder for the PNG plots")
    p.add_argument("--seed", type=int, default=0, help="problem generator seed (and ToT sampling seed)")
    p.add_argument("--suite", default="graded", help="problem suite (cluster/problems.py)")
    p.add_argument(
        "--tiers",
        choices=["difficulty", "scorer"],
        default="difficulty",
        help="each problem's tier: its difficulty level's (default) or the complexity scorer's",
    )
    p.add_argument("--no-tot", dest="tot", action="store_false", help="leave out the Tree-of-Thought policy")
    add_engine_arguments(p)


# ---------------------------------------------------------------- jobs


def problem_tiers(problems: list[Problem], mode: str, complexity_file: str, model: str) -> list[str]:
    """Each problem's tier: its difficulty level's, or the scorer's as the router would pick it for
    this model (weights fitted to another model fall back to the hand-set ones, with a warning)."""
    if mode == "difficulty":
        return [p.tier or "medium" for p in problems]
    from services.reasoning.complexity import ComplexityConfig, pick_tier

    cfg, warnings = ComplexityConfig.load(complexity_file).for_model(model)
    for w in warnings:
        print(f"warning: {w}")
    return [pick_tier(None, p.question, cfg)[0] for p in problems]


def exit_plan(table: TierTable, tier: str, threshold: float | None) -> RoundPlan:
    """The confidence-exit policy: the tier's plan (its exit rule too) with the domain's threshold."""
    return plan_for(table, tier, confidence_threshold=threshold, domain=EXIT_DOMAIN)


def build_jobs(
    problems: list[Problem],
    tiers: list[str],
    table: TierTable,
    threshold: float | None,
    args: argparse.Namespace,
) -> list[Job]:
    """Per problem: fixed-6, confidence-exit, ToT; then the prefix-check runs."""
    g = greedy(args.max_tokens)
    fixed = plan_for(table, FIXED_TIER, max_rounds=FIXED_MAX, min_rounds=FIXED_MAX)
    tot = plan_for(
        table,
        TOT_TIER,
        max_rounds=TOT_DEPTH,
        confidence_threshold=threshold,
        strategy="tot",
        domain=EXIT_DOMAIN,
    )
    jobs: list[Job] = []
    for i, (p, tier) in enumerate(zip(problems, tiers, strict=True)):
        jobs.append(Job(p, f"fixed-{FIXED_MAX}", fixed, g, f"fixed{FIXED_MAX}-{p.id}"))
        jobs.append(Job(p, "confidence-exit", exit_plan(table, tier, threshold), g, f"exit-{p.id}"))
        if args.tot:
            sampled = tot_sampling(args.max_tokens, args.seed * 1000 + i)
            jobs.append(Job(p, "tot", tot, sampled, f"tot-{p.id}"))
    for i, k in PREFIX_CHECKS:
        if i < len(problems):
            plan = plan_for(table, FIXED_TIER, max_rounds=k, min_rounds=k)
            jobs.append(Job(problems[i], f"check-fixed-{k}", plan, g, f"check{k}-{problems[i].id}"))
    return jobs


# ---------------------------------------------------------------- derived policies and metrics


def prefix(fixed: JobResult, k: int) -> Sample:
    """The fixed-k run as the first k rounds of the fixed-6 run (fewer if it stopped on context)."""
    rounds = fixed.rounds[: min(k, len(fixed.rounds))]
    last = rounds[-1]
    return Sample(last.correct, sum(r.completion_tokens for r in rounds), last.done_ms, len(rounds))


def diminishing_returns_round(acc: dict[int, float]) -> int:
    """The first k after which one more fixed round gains less than one accuracy point."""
    return next((k for k in range(1, FIXED_MAX) if acc[k + 1] - acc[k] < GAIN_POINT), FIXED_MAX)


def prefix_check(problems: list[Problem], by: dict[tuple[str, str], JobResult]) -> dict[str, Any]:
    runs = []
    for i, k in PREFIX_CHECKS:
        if i >= len(problems):
            continue
        pid = problems[i].id
        real, full = by[(f"check-fixed-{k}", pid)], by[(f"fixed-{FIXED_MAX}", pid)]
        pre = full.rounds[: min(k, len(full.rounds))]
        runs.append(
            {
                "problem": pid,
                "k": k,
                "prefix_answer": pre[-1].answer,
                "run_answer": real.answer,
                "answers_equal": pre[-1].answer == real.answer,
                "texts_equal": [r.text for r in pre] == [r.text for r in real.rounds],
            }
        )
    return {"ok": all(r["answers_equal"] for r in runs), "runs": runs}


def summarize(
    problems: list[Problem],
    tiers: list[str],
    table: TierTable,
    threshold: float | None,
    results: list[JobResult],
) -> dict[str, Any]:
    by = {(r.policy, r.problem_id): r for r in results}
    fixed = [by[(f"fixed-{FIXED_MAX}", p.id)] for p in problems]
    policies: dict[str, dict[str, float]] = {}
    for k in range(1, FIXED_MAX + 1):
        policies[f"fixed-{k}"] = metrics([prefix(f, k) for f in fixed])
    ceilings = [min(table.tiers[t].max_rounds, FIXED_MAX) for t in tiers]
    policies["tier-ceiling"] = metrics([prefix(f, k) for f, k in zip(fixed, ceilings, strict=True)])
    exits = [by[("confidence-exit", p.id)] for p in problems]
    exit_plans = [exit_plan(table, t, threshold) for t in tiers]
    policies["confidence-exit"] = metrics([of_result(r) for r in exits])
    if ("tot", problems[0].id) in by:
        policies["tot"] = metrics([of_result(by[("tot", p.id)]) for p in problems])
    # The exit policy replayed on the fixed-6 rounds with the same pure policy: where the real run
    # exited elsewhere, batching changed a round (the cost trick's premise failed there).
    replayed = [replay_exit(f, plan) for f, plan in zip(fixed, exit_plans, strict=True)]
    agree = sum(r == len(e.rounds) for r, e in zip(replayed, exits, strict=True)) / len(problems)
    acc = {k: policies[f"fixed-{k}"]["accuracy"] for k in range(1, FIXED_MAX + 1)}
    conf, top = policies["confidence-exit"], policies[f"fixed-{FIXED_MAX}"]
    return {
        "policies": policies,
        "token_saving_fraction": 1.0 - conf["mean_tokens"] / top["mean_tokens"]
        if top["mean_tokens"]
        else 0.0,
        "accuracy_delta": conf["accuracy"] - top["accuracy"],
        "accuracy_delta_unit": "fraction",
        "diminishing_returns_round": diminishing_returns_round(acc),
        "prefix_check": prefix_check(problems, by),
        "confidence_exit_replay_agreement": agree,
        "problems": [
            {
                "id": p.id,
                "difficulty": p.difficulty,
                "tier": t,
                "question": p.question,
                "answer": p.answer,
                "runs": {
                    pol: by[(pol, p.id)].summary()
                    for pol in (f"fixed-{FIXED_MAX}", "confidence-exit", "tot")
                    if (pol, p.id) in by
                },
            }
            for p, t in zip(problems, tiers, strict=True)
        ],
    }


def replay_exit(fixed: JobResult, plan: RoundPlan) -> int:
    """Rounds the plan would have run, deciding on the fixed-6 run's rounds (same prompts)."""
    for n, r in enumerate(fixed.rounds, start=1):
        if decide(plan, n, r.signals if r.signals is not None else r.confidence).exit:
            return n
    return len(fixed.rounds)


# ---------------------------------------------------------------- running and reporting


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from_args(args)
    table = TierTable.load(settings.tiers_file)
    # The router's threshold: a calibration of another model does not apply (DomainRegistry.for_model).
    domains, warnings = DomainRegistry.load(settings.domains_file).for_model(settings.engine.model)
    for w in warnings:
        print(f"warning: {w}")
    threshold = domains.threshold_for(EXIT_DOMAIN)
    problems = load_problems(args.suite, args.problems, args.seed)
    tiers = problem_tiers(problems, args.tiers, settings.complexity_file, settings.engine.model)
    jobs = build_jobs(problems, tiers, table, threshold, args)
    results, timings = await run_jobs(
        settings.engine, jobs, args.concurrency, "tax bench", len(problems), settings.prompts
    )
    res = summarize(problems, tiers, table, threshold, results)
    head = {
        "model": args.model,
        "n": len(problems),
        "seed": args.seed,
        "suite": args.suite,
        "tiers_from": args.tiers,
        "confidence_threshold": threshold,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "engine": engine_settings_note(settings),
        "timings": timings,
    }
    return head | res


def print_table(res: dict[str, Any]) -> None:
    t = res["timings"]
    print(
        f"\nreasoning tax: {res['n']} problems ({res['suite']}, tiers by {res['tiers_from']}), "
        f"model {res['model']}, {t['run_s']:.0f} s ({t['per_problem_s']:.1f} s/problem, "
        f"{t['tokens_per_s']:.1f} tok/s)"
    )
    print(f"{'policy':18} {'accuracy':>9} {'tokens':>9} {'latency s':>10} {'rounds':>7}")
    for name, m in res["policies"].items():
        print(
            f"{name:18} {m['accuracy']:9.3f} {m['mean_tokens']:9.1f} "
            f"{m['mean_latency_ms'] / 1000:10.2f} {m['mean_rounds']:7.2f}"
        )
    pc = res["prefix_check"]
    print(
        f"confidence exit vs fixed-{FIXED_MAX}: token saving {res['token_saving_fraction']:.3f}, "
        f"accuracy delta {res['accuracy_delta']:+.3f}; diminishing returns after round "
        f"{res['diminishing_returns_round']}; prefix check {'ok' if pc['ok'] else 'FAILED'} "
        f"({len(pc['runs'])} runs); exit replay agreement {res['confidence_exit_replay_agreement']:.2f}"
    )


def main(args: argparse.Namespace) -> int:
    from bench import tax_thinking
    from bench.plots import plot_tax, plot_thinking_tax
    from services.config import DEFAULT_CONFIG

    args.model = args.model or default_model()
    if args.mode == "thinking":
        args.config = args.config or str(THINKING_CONFIG)
        res = asyncio.run(tax_thinking.measure(args))
        tax_thinking.print_table(res)
        res["plots"] = [str(plot_thinking_tax(res, Path(args.plots)))]
    else:
        args.config = args.config or str(DEFAULT_CONFIG)
        res = asyncio.run(measure(args))
        print_table(res)
        res["plots"] = [str(p) for p in plot_tax(res, Path(args.plots))]
    write_json(args.json_path, res)
    print(f"wrote {args.json_path} and {', '.join(res['plots'])}")
    return 0
