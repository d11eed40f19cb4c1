"""`ponder bench policy`: is the default policy non-inferior to the best fixed policy, at a fraction of
the tokens of the `medium` ceiling, on problems calibration never saw?

Problems: the routing calibration's reasoning-gym families (`--suite held-out`: generated with another
seed; any question calibration or a domain's warm-up also generated is dropped) or families no
calibration uses (`--suite unseen`), each posed as a plain question and in multiple-choice form (the
same problems in both formats, paired). Each prompt runs one greedy chain on a real engine in this
process (cluster/runner.py) to the medium ceiling (4 rounds), or further where the default policy's
plan allows more; every policy below is read off that chain, deciding exits with the same pure
policy the router runs (`tiers.decide` on each round's signals): a greedy round's prompt does not
depend on the ceiling, so a policy's k rounds are the chain's first k (checked by `bench tax`).

Policies: fixed-k (exactly k rounds, k = 1..4; fixed-4 is the medium ceiling), tier low and tier
medium as a client naming the tier gets them (confidence exits with the domain's threshold), and
the default (no tier named: the complexity scorer for this model, domain detection, ToT only where
the domain's evidence says it pays). Per format: each policy's accuracy (Wilson 95%) and mean
completion tokens; the best fixed policy; the default minus it, paired, with a 95% interval;
non-inferior when that interval's lower end is above -margin; the default's tokens over fixed-4's
(95% paired bootstrap). `--from` re-analyses a saved result without an engine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from bench import write_json
from bench.policy_stats import Interval, best_fixed, paired_difference, verdict, wilson
from cluster.calibrate_routing import ROUTING, multiple_choice
from cluster.errors import CliError
from cluster.problems import Problem, Source, load_problems, warmup_problems
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
)
from services.reasoning.complexity import ComplexityConfig
from services.reasoning.domains import DomainRegistry
from services.reasoning.planning import Admission, PlanRequest, RequestPlanner
from services.reasoning.signals import Signals
from services.reasoning.tiers import RoundPlan, TierTable, decide

COMMAND = ("policy", "default policy vs the best fixed one, paired, on held-out problems (real engine)")
REFERENCE = "fixed-4"  # the medium ceiling: the default's tokens are measured against it
FIXED_K = (1, 2, 3, 4)
NAMED_TIERS = ("low", "medium")
FORMATS = ("plain", "multiple-choice")
# Families no calibration or warm-up uses: counting and deduction stories, number theory, equations,
# geometry, word problems, sequences, yes/no (True/False) questions.
UNSEEN: tuple[Source, ...] = (
    Source("aiw", {}, "story"),
    Source("lcm", {}, "lcm"),
    Source("simple_equations", {}, "equations"),
    Source("simple_geometry", {}, "geometry"),
    Source("gsm_symbolic", {}, "word"),
    Source("number_sequence", {}, "sequence"),
    Source("count_bits", {}, "bits"),
    Source("ransom_note", {}, "truefalse"),
)
SUITES = {"held-out": ROUTING, "unseen": UNSEEN}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from services.config import DEFAULT_CONFIG

    p.add_argument("--json", dest="json_path", required=True, help="write the results (and traces) here")
    p.add_argument("--model", help="model to run (default: qwen2.5-coder-0.5b-instruct if pulled)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="app config (tiers, domains, scorer)")
    p.add_argument("--problems", type=int, default=300, help="problems per format")
    p.add_argument("--suite", choices=sorted(SUITES), default="held-out", help="problem families")
    p.add_argument("--seed", type=int, default=1, help="problem seed (calibration used 0)")
    p.add_argument("--max-tokens", type=int, default=96, help="most tokens per round")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (the engine batches them)")
    p.add_argument("--margin", type=float, default=0.02, help="non-inferiority margin (a fraction)")
    p.add_argument("--token-bound", type=float, default=0.6, help="default tokens / fixed-4 tokens, at most")
    p.add_argument("--plots", default=str(repo_path("bench", "results")), help="folder for the frontier plot")
    p.add_argument("--from", dest="from_path", help="re-analyse this result's traces (no engine)")
    add_engine_arguments(p)


# ---------------------------------------------------------------- problems


def calibration_questions(settings: Any) -> set[str]:
    """Every question routing calibration (its seed, a superset of its count) or a domain's warm-up
    generated: none may be evaluated on."""
    seen: set[str] = set()
    block = ComplexityConfig.load(settings.complexity_file).calibration
    if block is not None:
        seen |= {p.question for p in load_problems(list(ROUTING), block.prompts, block.seed)}
    for d in DomainRegistry.load(settings.domains_file).domains.values():
        if d.warmup:
            seen |= {p.question for p in warmup_problems(d.warmup, None, 0)}
    return seen


def suite_prompts(suite: str, n: int, seed: int, exclude: set[str]) -> tuple[list[Problem], int]:
    """n problems with a multiple-choice form, not in `exclude`, in both formats (plain first), and
    how many generated problems were dropped as seen."""
    srcs, want = list(SUITES[suite]), n
    while True:
        pool = load_problems(srcs, want, seed)
        fresh = [p for p in pool if p.question not in exclude]
        pairs = [(p, m) for p in fresh if (m := multiple_choice(p, seed)) is not None]
        if len(pairs) >= n or want > 4 * n:
            break
        want = want + n // 2 + len(srcs)
    if len(pairs) < n:
        raise CliError(f"suite {suite}: only {len(pairs)} fresh problems with a multiple-choice form")
    pairs = pairs[:n]
    return [p for p, _ in pairs] + [m for _, m in pairs], len(pool) - len(fresh)


# ---------------------------------------------------------------- plans and replay


@dataclasses.dataclass(frozen=True)
class Policies:
    """What the router would plan for a prompt: the default, and each named tier."""

    planner: RequestPlanner
    domains: DomainRegistry

    def plan(self, text: str, tier: str | None = None) -> tuple[RoundPlan, str]:
        req = PlanRequest(text, tier=tier)
        planned = self.planner.plan(req)
        p = planned.plan
        threshold = self.domains.threshold_for(p.domain)
        admitted = RequestPlanner.admitted(p, req, Admission(p.max_rounds, p.min_rounds, threshold))
        return admitted, planned.tier_reason


def policies_for(config: str, model: str) -> tuple[Policies, list[str]]:
    """The router's planning for `model` from the app config's files, and its warnings (a scorer or
    a threshold calibrated on another model falls back)."""
    from services.config import AppConfig

    cfg = AppConfig.load(config)
    table = TierTable.load(cfg.depth_control.tiers_file)
    complexity, warnings = ComplexityConfig.load(cfg.router.complexity_file).for_model(model)
    domains, more = DomainRegistry.load(cfg.depth_control.domains_file).for_model(model)
    return Policies(RequestPlanner(table, complexity, domains), domains), warnings + more


def replay(rounds: list[dict], plan: RoundPlan) -> int:
    """Rounds the plan runs on this chain: decided by the pure policy on each round's signals."""
    if plan.strategy != "cot":
        raise CliError(f"the default plan is {plan.strategy} here; this bench replays chains only")
    for n, r in enumerate(rounds, start=1):
        if decide(plan, n, Signals(**r["signals"]) if r["signals"] else None).exit:
            return n
    return len(rounds)


def outcome(rounds: list[dict], k: int) -> tuple[bool, int]:
    """A policy that ran k rounds of this chain (fewer if the chain stopped on context): right, tokens."""
    k = min(k, len(rounds))
    return bool(rounds[k - 1]["correct"]), sum(r["completion_tokens"] for r in rounds[:k])


# ---------------------------------------------------------------- running


def trace(p: Problem, fmt: str, res: JobResult, tier: str, reason: str) -> dict[str, Any]:
    return {
        "id": p.id,
        "group": p.id.removesuffix("-mc"),
        "format": fmt,
        "family": f"{p.dataset}:{p.difficulty}",
        "question": p.question,
        "default_tier": tier,
        "tier_reason": reason,
        "rounds": [
            {
                "answer": r.answer,
                "correct": r.correct,
                "completion_tokens": r.completion_tokens,
                "closed": r.closed,
                "signals": dataclasses.asdict(r.signals) if r.signals is not None else None,
            }
            for r in res.rounds
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.model = args.model or default_model()
    settings = settings_from_args(args)
    pols, warnings = policies_for(args.config, args.model)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    prompts, dropped = suite_prompts(args.suite, args.problems, args.seed, calibration_questions(settings))
    table = TierTable.load(settings.tiers_file)
    jobs, planned = [], []
    for p in prompts:
        plan, reason = pols.plan(p.question)
        top = max(FIXED_K[-1], plan.max_rounds)
        chain = plan_for(table, "high", max_rounds=top, min_rounds=top)
        jobs.append(Job(p, "chain", chain, greedy(args.max_tokens), f"policy-{p.id}"))
        planned.append((plan.tier, reason))
    print(f"{len(prompts)} prompts ({args.suite}, {dropped} dropped as seen in calibration)", file=sys.stderr)
    results, timings = asyncio.run(
        run_jobs(settings.engine, jobs, args.concurrency, "policy", len(prompts), settings.prompts)
    )
    n = len(prompts) // 2
    traces = [
        trace(p, FORMATS[i >= n], r, tier, reason)
        for i, (p, r, (tier, reason)) in enumerate(zip(prompts, results, planned, strict=True))
    ]
    return {
        "bench": "policy",
        "model": args.model,
        "suite": args.suite,
        "seed": args.seed,
        "problems_per_format": n,
        "dropped_as_seen": dropped,
        "max_tokens_per_round": args.max_tokens,
        "engine": engine_settings_note(settings),
        "timings": timings,
        "config": args.config,
        "traces": traces,
    }


# ---------------------------------------------------------------- analysis


def analyse(res: dict[str, Any], pols: Policies, margin: float, token_bound: float) -> dict[str, Any]:
    """Per format: every policy's accuracy and tokens, the best fixed policy, the verdict."""
    out: dict[str, Any] = {}
    for fmt in FORMATS:
        rows = [t for t in res["traces"] if t["format"] == fmt]
        if not rows:
            continue
        runs = {f"fixed-{k}": [outcome(t["rounds"], k) for t in rows] for k in FIXED_K}
        for tier in NAMED_TIERS:
            runs[f"tier {tier}"] = [
                outcome(t["rounds"], replay(t["rounds"], pols.plan(t["question"], tier)[0])) for t in rows
            ]
        runs["default"] = [
            outcome(t["rounds"], replay(t["rounds"], pols.plan(t["question"])[0])) for t in rows
        ]
        table = {name: summary(r) for name, r in runs.items()}
        fixed = {k: v for k, v in table.items() if k != "default"}
        best = best_fixed(
            {k: v["accuracy"]["value"] for k, v in fixed.items()},
            {k: v["mean_tokens"] for k, v in fixed.items()},
        )
        v = verdict(
            [c for c, _ in runs["default"]],
            [c for c, _ in runs[best]],
            [t for _, t in runs["default"]],
            [t for _, t in runs[REFERENCE]],
            margin=margin,
            token_bound=token_bound,
            seed=res["seed"],
        )
        versus = {
            k: paired_difference([c for c, _ in runs["default"]], [c for c, _ in runs[k]]).as_dict()
            for k in fixed
        }
        tiers: dict[str, int] = {}
        for t in rows:
            tiers[t["default_tier"]] = tiers.get(t["default_tier"], 0) + 1
        out[fmt] = {
            "n": len(rows),
            "policies": table,
            "best_fixed": best,
            "verdict": v.as_dict(),
            "default_minus": versus,
            "default_tiers": tiers,
            "first_rounds": first_rounds(rows),
        }
    return out


def first_rounds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of first rounds that stated an answer, and that the router closed (older results: 0)."""
    firsts = [t["rounds"][0] for t in rows if t["rounds"]]
    n = max(len(firsts), 1)
    return {
        "answered": round(sum(r["answer"] is not None for r in firsts) / n, 4),
        "closed": round(sum(bool(r.get("closed")) for r in firsts) / n, 4),
    }


def summary(runs: list[tuple[bool, int]]) -> dict[str, Any]:
    right = sum(c for c, _ in runs)
    acc: Interval = wilson(right, len(runs))
    return {"accuracy": acc.as_dict(), "mean_tokens": round(sum(t for _, t in runs) / len(runs), 2)}


def print_table(analysis: dict[str, Any]) -> None:
    for fmt, a in analysis.items():
        first = a.get("first_rounds", {})
        print(
            f"\n{fmt} ({a['n']} prompts): default tiers {a['default_tiers']}; first rounds "
            f"answered {first.get('answered', 0):.3f}, closed by the router {first.get('closed', 0):.3f}"
        )
        print(f"{'policy':14} {'accuracy':>9} {'95% interval':>15} {'tokens':>8}")
        for name, m in a["policies"].items():
            acc = m["accuracy"]
            mark = "  <- best fixed" if name == a["best_fixed"] else ""
            print(
                f"{name:14} {acc['value']:9.3f} {acc['lo']:7.3f}-{acc['hi']:.3f} "
                f"{m['mean_tokens']:8.1f}{mark}"
            )
        others = ", ".join(
            f"{k} {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" for k, d in a["default_minus"].items()
        )
        print(f"default minus each fixed policy (paired, 95%): {others}")
        v = a["verdict"]
        d, r = v["difference"], v["token_ratio"]
        print(
            f"default - {a['best_fixed']}: {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] -> "
            f"{'non-inferior' if v['non_inferior'] else 'NOT shown non-inferior'} at margin {v['margin']}; "
            f"tokens / {REFERENCE}: {r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] "
            f"({'within' if v['within_tokens'] else 'ABOVE'} {v['token_bound']})"
        )


def check_args(args: argparse.Namespace) -> None:
    if args.problems < 2:
        raise CliError("--problems must be at least 2 (a paired interval needs two prompts per format)")
    if not 0 < args.margin < 1 or args.token_bound <= 0:
        raise CliError("--margin must be in (0, 1) and --token-bound above 0")
    if args.from_path and not Path(args.from_path).is_file():
        raise CliError(f"--from: no such result file: {args.from_path}")


def load(path: str) -> dict[str, Any]:
    import json

    try:
        res = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"--from: cannot read {path}: {exc}") from exc
    if not isinstance(res, dict) or res.get("bench") != "policy" or not res.get("traces"):
        raise CliError(f"--from: {path} is not a `ponder bench policy` result with traces")
    return res


def main(args: argparse.Namespace) -> int:
    check_args(args)
    res = load(args.from_path) if args.from_path else run(args)
    pols, _ = policies_for(res["config"], res["model"])
    res["margin"], res["token_bound"] = args.margin, args.token_bound
    res["analysis"] = analyse(res, pols, args.margin, args.token_bound)
    print_table(res["analysis"])
    from bench.plots import plot_policy_frontier

    res["plot"] = str(plot_policy_frontier(res, Path(args.plots)))
    print(f"wrote {write_json(args.json_path, res)} and {res['plot']}")
    return 0
