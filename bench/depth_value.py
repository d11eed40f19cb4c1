"""`ponder bench depth-value`: does the ceiling learned online (services/reasoning/depth_value.py)
converge where later rounds buy nothing, and stay where they do?

The real depth-control actor class (in this process, its real SQLite state file, no Ray) admits and
finishes a stream of chain sessions in one domain. Each session runs as many rounds as it was
granted (no early exit: the worst case for the tax) and reports, per round, whether it changed the
previous round's answer. Two sources of rounds:
- `real`: the per-round answers a real model gave on reasoning-gym problems in `ponder bench tax`
  (bench/results/tax.json, its fixed-6 runs: every problem taken to 6 rounds), replayed in order and
  cycled;
- `scripted`: each later round changes the answer with probability `--change-rate` (seeded).
For each (source, tier) it reports when the effective ceiling first reached the tier's floor, the
ceiling at the end, the rounds per session before and after, and how many rounds it saved.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import write_json
from services.config import DEFAULT_CONFIG, AppConfig
from services.control.depth_control import DepthControl

COMMAND = ("depth-value", "does the learned ceiling converge where later rounds change no answer")
TIERS = ("medium", "high")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="app config YAML (tiers, depth_value)")
    p.add_argument("--requests", type=int, default=300, help="sessions per run")
    p.add_argument(
        "--source",
        default=str(Path(__file__).resolve().parent / "results" / "tax.json"),
        help="a `ponder bench tax` result whose fixed-6 runs give the real rounds",
    )
    p.add_argument("--change-rate", type=float, default=0.3, help="scripted: a later round's change odds")
    p.add_argument("--seed", type=int, default=0)


def real_traces(path: str) -> tuple[list[list[str | None]], str]:
    """Per problem, the answers of its fixed-6 run's rounds, and the model that gave them."""
    res = json.loads(Path(path).read_text())
    traces = [[r["answer"] for r in p["runs"]["fixed-6"]["per_round"]] for p in res["problems"]]
    if not traces:
        raise SystemExit(f"{path}: no fixed-6 runs to replay")
    return traces, str(res.get("model"))


def scripted_traces(n: int, rounds: int, rate: float, seed: int) -> list[list[str | None]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        answer, trace = 0, []
        for k in range(rounds):
            if k and rng.random() < rate:
                answer += 1
            trace.append(str(answer))
        out.append(trace)
    return out


def run(cfg: dict, tier: str, traces: list[list[str | None]], requests: int, domain: str = "math") -> dict:
    """One stream of sessions through a fresh depth-control actor."""
    with tempfile.TemporaryDirectory() as state:
        dc = DepthControl({**cfg, "state_dir": state}, "bench")
        t = dc.table.tiers[tier]
        floor, ceiling = t.min_rounds, t.max_rounds
        rounds_run, ceilings, first_floor = [], [], None
        for i in range(requests):
            sid = f"bench-{tier}-{i}"
            adm = dc.admit(sid, "bench", tier, floor, ceiling, domain)
            if not adm["depth_value"]["explore"]:
                ceilings.append(adm["max_rounds"])
                if first_floor is None and adm["max_rounds"] == floor:
                    first_floor = i + 1
            answers = traces[i % len(traces)][: adm["max_rounds"]]
            reports = [
                {"decision": "x", "answer_changed": k > 0 and answers[k] != answers[k - 1]}
                for k in range(len(answers))
            ]
            dc.finish(sid, "bench", 0, reports, {"domain": domain, "tier": tier, "chain": True})
            rounds_run.append(len(answers))
        report = dc.depth_report().get(domain, {}).get(tier, {})
    first, last = rounds_run[:50], rounds_run[-50:]
    full = sum(min(ceiling, len(traces[i % len(traces)])) for i in range(requests))
    return {
        "tier": tier,
        "floor": floor,
        "ceiling": ceiling,
        "requests": requests,
        "final_ceiling": ceilings[-1] if ceilings else ceiling,
        "reached_floor_at_request": first_floor,
        "mean_rounds_first_50": sum(first) / len(first),
        "mean_rounds_last_50": sum(last) / len(last),
        "rounds_saved_fraction": round(1 - sum(rounds_run) / full, 4) if full else 0.0,
        "explored": requests - len(ceilings),
        "report": report,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    cfg = AppConfig.load(args.config).depth_control
    cfg.budgets.max_deep_sessions = max(cfg.budgets.max_deep_sessions, args.requests)  # no pressure here
    raw = cfg.model_dump()
    real, model = real_traces(args.source)
    scripted = scripted_traces(args.requests, 6, args.change_rate, args.seed)
    runs = []
    for source, traces in (("real", real), ("scripted", scripted)):
        for tier in TIERS:
            runs.append({"source": source, **run(raw, tier, traces, args.requests)})
    changes = sum(a != b for t in real for a, b in zip(t, t[1:], strict=False))
    return {
        "config": cfg.depth_value.model_dump(),
        "real_source": {
            "file": args.source,
            "model": model,
            "problems": len(real),
            "answer_changes": changes,
        },
        "scripted_change_rate": args.change_rate,
        "seed": args.seed,
        "runs": runs,
    }


def print_table(res: dict) -> None:
    src = res["real_source"]
    print(
        f"depth value: real rounds = {src['problems']} problems of {src['model']} (their later rounds "
        f"changed {src['answer_changes']} answers); scripted = each later round changes the answer "
        f"{res['scripted_change_rate']:.0%} of the time"
    )
    print(
        f"{'source':9} {'tier':7} {'floor..ceiling':>14} {'floor reached at':>17} {'final':>6} "
        f"{'rounds first 50':>16} {'last 50':>8} {'rounds saved':>13}"
    )
    for r in res["runs"]:
        at = r["reached_floor_at_request"] or "never"
        span = f"{r['floor']}..{r['ceiling']}"
        print(
            f"{r['source']:9} {r['tier']:7} {span:>14} {at!s:>17} {r['final_ceiling']:>6} "
            f"{r['mean_rounds_first_50']:>16.2f} {r['mean_rounds_last_50']:>8.2f} "
            f"{r['rounds_saved_fraction']:>13.1%}"
        )


def main(args: argparse.Namespace) -> int:
    if args.requests < 1:
        print("error: --requests must be at least 1", file=sys.stderr)
        return 2
    res = measure(args)
    print_table(res)
    if args.json_path:
        print(f"wrote {write_json(args.json_path, res)}")
    return 0
