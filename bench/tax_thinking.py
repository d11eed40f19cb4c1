"""`ponder bench tax --mode thinking`: accuracy against tokens of each way to bound a thinking trace.

The model is served as the router serves a model that thinks natively (services/loop/thinking_run.py):
its chat template opens a `<think>` trace (configs/local-cpu-thinking.yaml), the trace runs in
segments of `--segment-tokens`, and the answer is generated after the trace is closed. A real vLLM
engine runs in this process (cluster/runner.py) on graded reasoning-gym problems, greedy, for these
policies, all within one envelope of 1..`SEGMENTS` segments:
- budget-k, k in BUDGETS: exactly k segments (min = max = k; a model that closes its trace sooner
  is told to go on, s1's budget forcing), then the answer;
- confidence-exit: stop after any segment whose entropy confidence reaches the threshold (the math
  domain's, or --threshold);
- probe-exit: after each segment a probe asks the closed trace for its answer (`probe_tokens`,
  greedy); stop when two probes in a row agree (Dynasor);
- tot: Tree-of-Thought over segments (2 next segments per expansion from the same trace prefix,
  beam of 1, 10 nodes, each new segment probed; sampled at 0.7 with a fixed seed per problem);
- tier: each problem's tier as the router plans it with configs/tiers-thinking.yaml (its budget, exit
  rule, probes; high's Tree-of-Thought only where the domain's evidence says it pays).

Tokens are every completion token a request cost: trace, probes and answer.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
from typing import Any

from bench.samples import metrics, of_result
from cluster.problems import Problem, load_problems
from cluster.runner import Job, JobResult, engine_settings_note, greedy, run_jobs, settings_from_args
from services.reasoning.complexity import ComplexityConfig
from services.reasoning.domains import DomainRegistry
from services.reasoning.planning import PlanRequest, RequestPlanner
from services.reasoning.tiers import RoundPlan, TierTable

SEGMENTS = 6  # the envelope: at most this many segments
BUDGETS = (1, 2, 4, 6)
PROBE_TOKENS = 8
EXIT_DOMAIN = "math"


def envelope(
    segment_tokens: int,
    min_rounds: int = 1,
    max_rounds: int = SEGMENTS,
    threshold: float | None = None,
    **kw: Any,
) -> RoundPlan:
    return RoundPlan(
        "bench", min_rounds, max_rounds, threshold, segment_tokens=segment_tokens, mode="thinking", **kw
    )


def policies(segment_tokens: int, threshold: float) -> dict[str, RoundPlan]:
    out = {f"budget-{k}": envelope(segment_tokens, min_rounds=k, max_rounds=k) for k in BUDGETS}
    out["confidence-exit"] = envelope(segment_tokens, threshold=threshold)
    out["probe-exit"] = envelope(segment_tokens, exit_rule={"stable_for": 2}, probe_tokens=PROBE_TOKENS)
    out["tot"] = envelope(
        segment_tokens,
        strategy="tot",
        tot={
            "branching": 2,
            "max_total_nodes": 10,
            "strategy": "beam",
            "beam_width": 1,
            "max_depth": SEGMENTS,
        },
        probe_tokens=PROBE_TOKENS,
    )
    return out


def build_jobs(
    problems: list[Problem], planner: RequestPlanner, plans: dict[str, RoundPlan], max_tokens: int
) -> list[Job]:
    g = greedy(max_tokens)
    jobs = []
    for i, p in enumerate(problems):
        # as the router plans a request that names its tier (a tier's ToT only where it pays)
        asked = PlanRequest(
            user_text=p.question, tier=p.tier or "medium", domain=EXIT_DOMAIN, mode="thinking"
        )
        tier = planner.plan(asked).plan
        for name, plan in [*plans.items(), ("tier", tier)]:
            # a tree samples its siblings (a fixed seed per problem); every other policy is greedy
            s = dataclasses.replace(g, temperature=0.7, seed=i) if plan.strategy == "tot" else g
            jobs.append(Job(p, name, plan, s, f"{name}-{p.id}"))
    return jobs


def thinking_metrics(results: list[JobResult]) -> dict[str, Any]:
    t = [r.thinking or {} for r in results]
    m: dict[str, Any] = metrics([of_result(r) for r in results])
    m["mean_thinking_tokens"] = statistics.fmean(x.get("thinking_tokens", 0) for x in t)
    m["mean_segments"] = statistics.fmean(x.get("segments", 0) for x in t)
    m["mean_probes"] = statistics.fmean(len(x.get("probes", [])) for x in t)
    m["mean_probe_tokens"] = statistics.fmean(x.get("probe_tokens", 0) for x in t)
    m["closed_by"] = dict(collections.Counter(x.get("closed_by", "?") for x in t))
    return m


def summarize(problems: list[Problem], results: list[JobResult], names: list[str]) -> dict[str, Any]:
    by = {(r.policy, r.problem_id): r for r in results}
    pol = {n: thinking_metrics([by[(n, p.id)] for p in problems]) for n in names}
    top = pol[f"budget-{BUDGETS[-1]}"]
    return {
        "policies": pol,
        "vs_full_budget": {
            n: {
                "token_saving_fraction": round(1.0 - m["mean_tokens"] / top["mean_tokens"], 4),
                "accuracy_delta": round(m["accuracy"] - top["accuracy"], 4),
            }
            for n, m in pol.items()
            if top["mean_tokens"]
        },
        "problems": [
            {
                "id": p.id,
                "tier": p.tier,
                "answer": p.answer,
                "runs": {n: by[(n, p.id)].summary() for n in names},
            }
            for p in problems
        ],
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from_args(args)
    if settings.engine.reasoning is None and settings.engine.chat_template is None:
        raise SystemExit(f"--mode thinking: {args.config} gives the model no thinking template or markers")
    # As the router builds its planner: evidence and fitted weights apply only to their own model.
    model = settings.engine.model
    domains, warnings = DomainRegistry.load(settings.domains_file).for_model(model)
    complexity, more = ComplexityConfig.load(settings.complexity_file).for_model(model)
    for w in [*warnings, *more]:
        print(f"warning: {w}")
    planner = RequestPlanner(TierTable.load(settings.tiers_file), complexity, domains)
    threshold = args.threshold
    if threshold is None:
        threshold = domains.threshold_for(EXIT_DOMAIN)
    problems = load_problems(args.suite, args.problems, args.seed)
    plans = policies(args.segment_tokens, threshold)
    jobs = build_jobs(problems, planner, plans, args.max_tokens)
    results, timings = await run_jobs(
        settings.engine, jobs, args.concurrency, "thinking tax bench", len(problems), settings.prompts
    )
    head = {
        "mode": "thinking",
        "model": args.model,
        "config": args.config,
        "n": len(problems),
        "seed": args.seed,
        "suite": args.suite,
        "segment_tokens": args.segment_tokens,
        "segments": SEGMENTS,
        "probe_tokens": PROBE_TOKENS,
        "confidence_threshold": threshold,
        "answer_max_tokens": args.max_tokens,
        "engine": engine_settings_note(settings),
        "timings": timings,
    }
    return head | summarize(problems, results, [*plans, "tier"])


def print_table(res: dict[str, Any]) -> None:
    t = res["timings"]
    print(
        f"\nthinking tax: {res['n']} problems ({res['suite']}), model {res['model']}, segments of "
        f"{res['segment_tokens']} tokens, {t['run_s']:.0f} s ({t['tokens_per_s']:.1f} tok/s)"
    )
    cols = f"{'policy':16} {'accuracy':>9} {'tokens':>8} {'thinking':>9} {'segments':>9} {'probes':>7}"
    print(cols + f" {'latency s':>10}  closed by")
    for name, m in res["policies"].items():
        closed = ", ".join(f"{k} {v}" for k, v in sorted(m["closed_by"].items()))
        print(
            f"{name:16} {m['accuracy']:9.3f} {m['mean_tokens']:8.1f} {m['mean_thinking_tokens']:9.1f} "
            f"{m['mean_segments']:9.2f} {m['mean_probes']:7.2f} {m['mean_latency_ms'] / 1000:10.2f}  {closed}"
        )
