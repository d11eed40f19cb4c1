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

from cluster.problems import Source, load_problems
from cluster.runner import Job, Runner, Settings, greedy, plan_for
from services.reasoning.domains import Domain, TotEvidence, tot_evidence
from services.reasoning.tiers import TierTable
from services.worker.engine import SamplingSpec

TOT_TEMPERATURE = 0.7  # siblings must differ: greedy ones would be identical (as bench tax samples)


def tot_tier(table: TierTable) -> str:
    """The tier whose strategy is Tree-of-Thought (ValueError when the table has none)."""
    names = [name for name, t in table.tiers.items() if t.strategy == "tot"]
    if not names:
        raise ValueError("the tier table has no Tree-of-Thought tier (strategy: tot) to measure")
    return names[0]


def jobs_for(args: argparse.Namespace, d: Domain, table: TierTable, domain: str) -> list[Job]:
    sources = [Source(w.dataset, w.config, f"{w.dataset}{i}", size=w.size) for i, w in enumerate(d.warmup)]
    problems = load_problems(sources, args.problems, args.seed)
    tier = tot_tier(table)
    ceiling = table.tiers[tier].max_rounds
    tree = plan_for(table, tier, strategy="tot", domain=domain)
    chain = plan_for(table, tier, max_rounds=ceiling, min_rounds=ceiling, domain=domain)  # no exit
    jobs = []
    for i, p in enumerate(problems):
        sampled = SamplingSpec(
            max_tokens=args.max_tokens, temperature=TOT_TEMPERATURE, seed=args.seed * 1000 + i, top_logprobs=5
        )
        jobs.append(Job(p, "tot", tree, sampled, f"tot-{p.id}"))
        jobs.append(Job(p, "chain", chain, greedy(args.max_tokens), f"chain-{p.id}"))
    return jobs


async def _run(args: argparse.Namespace, settings: Settings, jobs: list[Job]) -> list:
    runner = Runner(settings.engine, settings.prompts)
    await runner.start()
    try:
        return await runner.run_all(jobs, args.concurrency, desc=f"ToT vs chain on {args.domain}")
    finally:
        await runner.shutdown()


def measure(args: argparse.Namespace, settings: Settings, d: Domain, table: TierTable) -> TotEvidence:
    jobs = jobs_for(args, d, table, args.domain)
    results = asyncio.run(_run(args, settings, jobs))
    by = {(r.policy, r.problem_id): r for r in results}
    ids = [j.problem.id for j in jobs if j.policy == "tot"]

    def runs(policy: str) -> list[tuple[bool, int]]:
        return [(by[(policy, i)].correct, by[(policy, i)].completion_tokens) for i in ids]

    return tot_evidence(runs("tot"), runs("chain"), args.model)


def print_evidence(domain: str, ev: TotEvidence) -> None:
    print(f"\nTree-of-Thought vs a chain to the ceiling on {domain}, {ev.n_problems} problems ({ev.model}):")
    print(f"{'policy':>7} {'accuracy':>9} {'tokens':>8}")
    print(f"{'tot':>7} {ev.accuracy_tot:9.3f} {ev.tokens_tot:8.1f}")
    print(f"{'chain':>7} {ev.accuracy_chain:9.3f} {ev.tokens_chain:8.1f}")
    print(ev.reason(domain))
