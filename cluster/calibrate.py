"""`ponder calibrate --domain D`: set a domain's confidence-exit threshold from warm-up problems;
`ponder calibrate --tot --domain D`: whether Tree-of-Thought pays there (cluster/calibrate_tot.py);
`ponder calibrate --routing`: fit the tier scorer to outcomes (cluster/calibrate_routing.py).

The domain's warm-up problems (configs/domains.yaml, reasoning-gym) run greedily to the ceiling of the
domain's tier with no early exit, on a real engine in this process (cluster/runner.py). Each problem
gives a trace: per round, its confidence, whether its final answer is right, its tokens.
`domains.calibrate` picks the lowest threshold that keeps the ceiling's accuracy; it is written back
to the registry file unless --dry-run.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from cluster.problems import warmup_problems
from cluster.runner import (
    Job,
    Runner,
    add_engine_arguments,
    default_model,
    greedy,
    plan_for,
    settings_from_args,
)
from services.reasoning.domains import (
    CalibrationResult,
    Domain,
    DomainRegistry,
    TraceRound,
    calibrate,
    save_calibration,
    save_tot_evidence,
)
from services.reasoning.tiers import TierTable

PERCENTILES = range(0, 100, 5)


class CalibrateError(Exception):
    """A user-facing failure (the CLI prints it as `error: ...`)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cluster.calibrate_routing import add_routing_arguments
    from services.config import DEFAULT_CONFIG

    p.add_argument("--domain", help="domain whose exit threshold to calibrate (configs/domains.yaml)")
    p.add_argument(
        "--tot",
        action="store_true",
        help="with --domain: measure Tree-of-Thought against a chain to the same tier's ceiling on the "
        "domain's warm-up problems and write the evidence (the domain's tot block)",
    )
    add_routing_arguments(p)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="app config YAML (names the domains file)")
    p.add_argument("--problems", type=int, help="warm-up problems in all (default: the warm-up sizes)")
    p.add_argument("--model", help="model (default: qwen2.5-coder-0.5b-instruct if pulled, else SmolLM2)")
    p.add_argument("--seed", type=int, default=0, help="problem generator seed")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per round")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy the exit may lose (fraction)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", dest="dry_run", action="store_false", help="write the result (default)")
    mode.add_argument("--dry-run", dest="dry_run", action="store_true", help="print only; change no file")
    p.set_defaults(dry_run=False)
    add_engine_arguments(p)


def domain_of(domains_file: str, name: str) -> Domain:
    """The domain to calibrate, or a clear error (checked before any engine starts)."""
    registry = DomainRegistry.load(domains_file)
    if name not in registry.domains:
        raise CalibrateError(f"unknown domain {name!r}; use one of {', '.join(registry.domains)}")
    d = registry.domains[name]
    if not d.warmup:
        with_warmups = [n for n, x in registry.domains.items() if x.warmup]
        raise CalibrateError(
            f"domain {name!r} has no warm-up datasets to calibrate on; add `warmup:` entries to it in "
            f"{domains_file}, or calibrate one of: {', '.join(with_warmups) or 'none'}"
        )
    return d


def print_result(domain: str, tier: str, res: CalibrationResult) -> None:
    print(f"\ncandidates for domain {domain} (tier {tier}), {res.n} problems:")
    print(f"{'percentile':>10} {'threshold':>10} {'accuracy':>9} {'tokens':>8} {'rounds':>7} {'exits':>6}")
    for c in res.candidates:
        pct = "never" if c.percentile is None else f"p{c.percentile:g}"
        thr = "-" if c.threshold is None else f"{c.threshold:.4f}"
        print(
            f"{pct:>10} {thr:>10} {c.accuracy:9.3f} {c.mean_tokens:8.1f} "
            f"{c.mean_rounds:7.2f} {c.exit_rate:6.2f}"
        )
    chosen = "never exit" if res.threshold is None else f"{res.threshold:.4f}"
    print(
        f"chosen threshold: {chosen}; accuracy {res.accuracy_exit:.3f} (ceiling {res.accuracy_ceiling:.3f}), "
        f"token saving {res.token_saving_fraction:.3f}"
    )


async def traces(
    args: argparse.Namespace, settings: Any, d: Domain, table: TierTable
) -> list[list[TraceRound]]:
    problems = warmup_problems(d.warmup, args.problems, args.seed)
    ceiling = table.tiers[d.tier].max_rounds
    plan = plan_for(table, d.tier, max_rounds=ceiling, min_rounds=ceiling)  # to the ceiling, no exit
    jobs = [Job(p, "ceiling", plan, greedy(args.max_tokens), f"cal-{p.id}") for p in problems]
    runner = Runner(settings.engine, settings.prompts)
    await runner.start()
    try:
        results = await runner.run_all(jobs, args.concurrency, desc=f"calibrate {args.domain}")
    finally:
        await runner.shutdown()
    return [[TraceRound(r.confidence, r.correct, r.completion_tokens) for r in res.rounds] for res in results]


def main(args: argparse.Namespace) -> int:
    from services.config import AppConfig

    if bool(args.domain) == bool(args.routing):
        raise CalibrateError("give either --domain NAME (an exit threshold) or --routing (the tier scorer)")
    if args.tot and not args.domain:
        raise CalibrateError("--tot measures one domain: give --domain NAME")
    if args.routing:
        from cluster import calibrate_routing

        args.model = args.model or default_model()
        if not 0.0 < args.held_out < 1.0:
            raise CalibrateError(f"--held-out must be between 0 and 1; got {args.held_out}")
        return calibrate_routing.main(args)
    app = AppConfig.load(args.config)
    d = domain_of(app.depth_control.domains_file, args.domain)
    args.model = args.model or default_model()
    settings = settings_from_args(args)
    table = TierTable.load(settings.tiers_file)
    if args.tot:
        return _tot(args, settings, d, table)
    tier = table.tiers[d.tier]
    res = calibrate(
        asyncio.run(traces(args, settings, d, table)),
        min_rounds=tier.min_rounds,
        max_rounds=tier.max_rounds,
        tolerance=args.tolerance,
        # p0 too: the least confidence seen lets every problem exit at min_rounds, the cheapest
        # policy, which should win whenever later rounds add no accuracy.
        percentiles=PERCENTILES,
    )
    print_result(args.domain, d.tier, res)
    if args.dry_run:
        print("dry run: nothing written")
    else:
        save_calibration(settings.domains_file, args.domain, res, args.model)
        print(f"wrote domain {args.domain!r} threshold and calibration to {settings.domains_file}")
    return 0


def _tot(args: argparse.Namespace, settings: Any, d: Domain, table: TierTable) -> int:
    from cluster import calibrate_tot

    try:
        calibrate_tot.tot_tier(table)
    except ValueError as e:
        raise CalibrateError(f"{e} ({settings.tiers_file})") from e
    evidence = calibrate_tot.measure(args, settings, d, table)
    calibrate_tot.print_evidence(args.domain, evidence)
    if args.dry_run:
        print("dry run: nothing written")
    else:
        save_tot_evidence(settings.domains_file, args.domain, evidence)
        print(f"wrote domain {args.domain!r} Tree-of-Thought evidence to {settings.domains_file}")
    return 0
