"""The sustained-load run's arithmetic (pure: no ray, no HTTP): percentiles, memory growth, and the
checks that the store, the engine and depth control came back to their baseline.

Memory: every Ponder process is sampled periodically. Its start is the median of the first samples
after the warm-up, its end the median of the last ones (the same number of samples each), so one
noisy sample moves neither. Growth = (end - start) / start.

KV store, "back to baseline" (kvstore/core.py): when a request ends the router marks its session
exited; an exited session's blocks are *not* evicted at once, they stay as a cache and are the
first to go when a shard needs room (a bulk eviction, `finish_session`, is not called by the router).
So after the load the store must hold no block of a live session and no live session beyond its
baseline, no pinned block and no write in flight; the blocks it still holds belong to exited
sessions, fit its slots, and every session entry left holds at least one block (entries leave
with their last block), so `sessions <= blocks`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

MIB = 1 << 20


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def latency_by_tier(requests: Iterable[dict], warmup_end_s: float) -> dict[str, dict]:
    """p50/p99 of request and per-round latency per tier, over successful requests started after
    the warm-up. Each request: tier, t_start (s), status, latency_ms, round_ms (list)."""
    by: dict[str, dict[str, list[float]]] = {}
    for r in requests:
        if r["t_start"] < warmup_end_s or r["status"] != 200:
            continue
        d = by.setdefault(r["tier"], {"request": [], "round": [], "rounds": []})
        d["request"].append(r["latency_ms"])
        d["round"].extend(r["round_ms"])
        d["rounds"].append(len(r["round_ms"]))
    return {
        tier: {
            "requests": len(d["request"]),
            "rounds_mean": round(statistics.fmean(d["rounds"]), 2),
            "request_ms_p50": _ms(percentile(d["request"], 50)),
            "request_ms_p99": _ms(percentile(d["request"], 99)),
            "round_ms_p50": _ms(percentile(d["round"], 50)),
            "round_ms_p99": _ms(percentile(d["round"], 99)),
        }
        for tier, d in sorted(by.items())
    }


def window_size(n: int) -> int:
    """Samples in each of the start and end windows: a fifth of them, 3 to 10."""
    return max(3, min(10, n // 5))


def growth(samples: Sequence[tuple[float, float]], warmup_end_s: float) -> dict | None:
    """Start vs end of one series of (t, bytes) samples; None when fewer than 2 windows' worth
    of samples follow the warm-up (or when windows would overlap)."""
    after = [v for t, v in sorted(samples) if t >= warmup_end_s]
    k = window_size(len(after))
    if len(after) < 2 * k:
        return None
    start, end = statistics.median(after[:k]), statistics.median(after[-k:])
    return {
        "start_mib": round(start / MIB, 1),
        "end_mib": round(end / MIB, 1),
        "growth_pct": round(100.0 * (end - start) / start, 2) if start else None,
        "samples": len(after),
        "window": k,
    }


def _steady(key: str, ticks: Sequence[dict]) -> bool:
    """A Ponder actor (a key without "/") must be there from the first sample after the warm-up to
    the last; a child process (compiler runs and the like come and go) in at least half of them."""
    seen = [key in t["procs"] for t in ticks]
    if "/" not in key:
        return bool(seen) and seen[0] and seen[-1]
    return sum(seen) * 2 >= len(seen) > 0


def memory_report(ticks: Sequence[dict], warmup_end_s: float, limit_pct: float) -> dict:
    """Per process and in total. A tick: {"t": s, "procs": {key: {"pid": .., "rss": bytes}}}.
    A process whose pid changed (restarted), or an actor not there throughout (replaced), fails the
    check; short-lived children are listed apart and left out of the total."""
    series: dict[str, list[tuple[float, float]]] = {}
    pids: dict[str, set[int]] = {}
    for tick in ticks:
        for key, p in tick["procs"].items():
            series.setdefault(key, []).append((tick["t"], p["rss"]))
            pids.setdefault(key, set()).add(p["pid"])
    measured = [t for t in ticks if t["t"] >= warmup_end_s]
    procs, transient, replaced = {}, {}, []
    for key in sorted(series):
        if not _steady(key, measured):
            if "/" in key:
                transient[key] = len(series[key])
                continue
            replaced.append(key)
        g = growth(series[key], warmup_end_s)
        procs[key] = {**(g or {}), "pids": sorted(pids[key]), "restarted": len(pids[key]) > 1}
    total = growth(
        [(t["t"], sum(p["rss"] for k, p in t["procs"].items() if k in procs)) for t in ticks], warmup_end_s
    )
    over = replaced + [
        k for k, p in procs.items() if p["restarted"] or (p.get("growth_pct") or 0.0) > limit_pct
    ]
    if total is not None and (total["growth_pct"] or 0.0) > limit_pct:
        over.append("total")
    return {
        "limit_pct": limit_pct,
        "processes": procs,
        "transient": transient,
        "total": total,
        "over_limit": sorted(set(over), key=over.index),
        "measured": total is not None,
    }


LIVE_KEYS = ("live_sessions", "live_blocks", "pinned", "pending")


def store_check(before: Sequence[dict], after: Sequence[dict]) -> list[str]:
    """Problems with the KV shards after the load (empty: back to baseline, see the module doc)."""
    problems = []
    base = {s["shard"]: s for s in before}
    for s in after:
        name = s["shard"]
        if "error" in s:
            problems.append(f"shard {name}: unreachable ({s['error']})")
            continue
        b = base.get(name, {})
        for key in LIVE_KEYS:
            if s.get(key, 0) > b.get(key, 0):
                problems.append(f"shard {name}: {key} {s.get(key)} > baseline {b.get(key, 0)}")
        if s["sessions"] > s["blocks"] + s.get("live_sessions", 0):
            problems.append(f"shard {name}: {s['sessions']} session entries for {s['blocks']} blocks")
        for tier, used in s["slots_used"].items():
            if used > s["slots_total"][tier]:
                problems.append(f"shard {name}: {used} {tier} slots used of {s['slots_total'][tier]}")
    missing = sorted(set(base) - {s["shard"] for s in after})
    problems += [f"shard {m}: gone after the load" for m in missing]
    return problems


DEPTH_KEYS = ("sessions", "deep_sessions_in_flight", "tot_nodes_in_flight", "sessions_waiting_for_nodes")


def depth_check(before: dict, after: dict) -> list[str]:
    """Depth control's live sessions, deep slots and ToT nodes back to their baseline; not restarted."""
    if "error" in after:
        return [f"depth control unreachable ({after['error']})"]
    problems = [
        f"depth control: {k} {after['budgets'][k]} > baseline {before.get('budgets', {}).get(k, 0)}"
        for k in DEPTH_KEYS
        if after["budgets"][k] > before.get("budgets", {}).get(k, 0)
    ]
    if before.get("starts") is not None and after["starts"] != before["starts"]:
        problems.append(f"depth control restarted ({before['starts']} -> {after['starts']} starts)")
    return problems


ENGINE_KEYS = ("kv_cache_usage", "requests_running", "requests_waiting", "unfinished_requests")


def engine_check(before: dict, after: dict) -> list[str]:
    """vLLM's KV cache usage, running/waiting requests and the engine's unfinished requests back to
    their baseline (a value absent before the load counts as 0; absent after it is a problem)."""
    problems = []
    for key in ENGINE_KEYS:
        a, b = after.get(key), before.get(key) or 0
        if a is None:
            problems.append(f"engine: {key} not reported after the load")
        elif a > b + 1e-9:
            problems.append(f"engine: {key} {a} > baseline {b}")
    return problems


def errors_check(requests: Sequence[dict]) -> list[str]:
    bad = [r for r in requests if r["status"] != 200]
    return [f"{len(bad)} of {len(requests)} requests failed (first: {bad[0].get('error')})"] if bad else []


def _fmt(x: object) -> str:
    return "-" if x is None else str(x)


def render(res: dict) -> str:
    """The run as a text table (the JSON has everything)."""
    c = res["config"]
    lines = [
        f"Sustained load: {c['sessions']} sessions for {c['minutes']} min (seed {c['seed']}, warm-up "
        f"{c['warmup_s']} s excluded): {res['requests']} requests, {res['errors']} errors, "
        f"{res['requests_per_min']} requests/min",
        "",
        "| tier | requests | rounds | request p50 ms | request p99 ms | round p50 ms | round p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for tier, t in res["by_tier"].items():
        lines.append(
            f"| {tier} | {t['requests']} | {t['rounds_mean']} | {_fmt(t['request_ms_p50'])} | "
            f"{_fmt(t['request_ms_p99'])} | {_fmt(t['round_ms_p50'])} | {_fmt(t['round_ms_p99'])} |"
        )
    m = res["memory"]
    lines += [
        "",
        f"| process (RSS) | start MiB | end MiB | growth % (limit {m['limit_pct']}) |",
        "|---|---|---|---|",
    ]
    rows = [*m["processes"].items(), ("total", m["total"] or {})]
    for key, p in rows:
        flag = " (restarted)" if p.get("restarted") else ""
        lines.append(
            f"| {key}{flag} | {_fmt(p.get('start_mib'))} | {_fmt(p.get('end_mib'))} | "
            f"{_fmt(p.get('growth_pct'))} |"
        )
    if m.get("transient"):
        lines.append(
            "short-lived children, not counted: "
            + ", ".join(f"{k} ({n} samples)" for k, n in m["transient"].items())
        )
    lines.append("")
    for part in ("kv_store", "depth_control", "engine"):
        lines.append(f"{part}: {'back to baseline' if not res[part]['problems'] else 'PROBLEMS'}")
        lines += [f"  - {x}" for x in res[part]["problems"]]
    lines.append("PASSED" if res["passed"] else "FAILED: " + "; ".join(res["problems"]))
    return "\n".join(lines)
