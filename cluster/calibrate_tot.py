"""`ponder calibrate --tot --domain D`: does Tree-of-Thought pay on this domain, for this model?

The domain's warm-up problems (configs/domains.yaml) run twice on a real engine in this process
(cluster/runner.py): as the tier table's Tree-of-Thought tier searches them (its node budget and
depth, sampled siblings, seeded per problem), and as a greedy chain to that tier's ceiling, the
most a chain of the tier may spend. `domains.tot_evidence` compares them and the evidence is
written into the domain's `tot` block: the planner gives a request that did not ask for ToT a tree
only where that block says it pays (services/reasoning/planning.py).
"""

from __future__ import annotations

import argparse
import asyncio

from cluster.problems import warmup_problems
from cluster.runner import Job, Settings, greedy, plan_for, run_jobs, tot_sampling
from services.reasoning.domains import Domain, TotEvidence, tot_evidence
from services.reasoning.tiers import TierTable


def tot_tier(table: TierTable) -> str:
    """The tier whose strategy is Tree-of-Thought (ValueError when the table has none)."""
    names = [name for name, t in table.tiers.items() if t.strategy == "tot"]
    if not names:
        raise ValueError("the tier table has no Tree-of-Thought tier (strategy: tot) to measure")
    return names[0]


def jobs_for(args: argparse.Namespace, d: Domain, table: TierTable, domain: str) -> list[Job]:
    problems = warmup_problems(d.warmup, args.problems, args.seed)
    tier = tot_tier(table)
    ceiling = table.tiers[tier].max_rounds
    tree = plan_for(table, tier, strategy="tot", domain=domain)
    chain = plan_for(table, tier, max_rounds=ceiling, min_rounds=ceiling, domain=domain)  # no exit
    jobs = []
    for i, p in enumerate(problems):
        jobs.append(Job(p, "tot", tree, tot_sampling(args.max_tokens, args.seed * 1000 + i), f"tot-{p.id}"))
        jobs.append(Job(p, "chain", chain, greedy(args.max_tokens), f"chain-{p.id}"))
    return jobs


def measure(args: argparse.Namespace, settings: Settings, d: Domain, table: TierTable) -> TotEvidence:
    jobs = jobs_for(args, d, table, args.domain)
    ids = [j.problem.id for j in jobs if j.policy == "tot"]
    run = run_jobs(
        settings.engine, jobs, args.concurrency, f"ToT vs chain on {args.domain}", len(ids), settings.prompts
    )
    results, _ = asyncio.run(run)
    by = {(r.policy, r.problem_id): r for r in results}

    def runs(policy: str) -> list[tuple[bool, int]]:
        return [(by[(policy, i)].correct, by[(policy, i)].completion_tokens) for i in ids]

    return tot_evidence(runs("tot"), runs("chain"), args.model)


def print_evidence(domain: str, ev: TotEvidence) -> None:
    print(f"\nTree-of-Thought vs a chain to the ceiling on {domain}, {ev.n_problems} problems ({ev.model}):")
    print(f"{'policy':>7} {'accuracy':>9} {'tokens':>8}")
    print(f"{'tot':>7} {ev.accuracy_tot:9.3f} {ev.tokens_tot:8.1f}")
    print(f"{'chain':>7} {ev.accuracy_chain:9.3f} {ev.tokens_chain:8.1f}")
    print(ev.reason(domain))
