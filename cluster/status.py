"""`ponder status`: a terminal summary of a running cluster, asked of its actors themselves.

`collect` joins the cluster as a driver and gathers plain dicts (nodes, worker replicas and their
queues, KV shards and tier usage, depth control's sessions and budgets); `render` is pure text.
Each part that cannot be reached is reported as such instead of failing the whole summary.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from kvstore.shard.client import SHARD_PREFIX
from services.config import DepthControlConfig

TIMEOUT_S = 5.0
WORKER = "ReasoningWorker"


def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref, timeout=TIMEOUT_S)


def _nodes() -> list[dict]:
    import ray

    return [
        {
            "node_id": n["NodeID"][:12],
            "address": n.get("NodeManagerAddress", ""),
            "alive": bool(n.get("Alive")),
            "cpus": n.get("Resources", {}).get("CPU", 0),
            "gpus": n.get("Resources", {}).get("GPU", 0),
        }
        for n in ray.nodes()
    ]


def _workers() -> list[dict]:
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a.get("namespace") != "serve" or f"#{WORKER}#" not in a["name"]:
            continue
        replica = a["name"].rsplit("#", 1)[-1]
        try:
            queue = _get(ray.get_actor(a["name"], namespace="serve").get_num_ongoing_requests.remote())
            out.append({"replica": replica, "ongoing_requests": int(queue)})
        except Exception as exc:  # starting, stopping or gone
            out.append({"replica": replica, "error": type(exc).__name__})
    return sorted(out, key=lambda w: w["replica"])


def _shards(namespace: str) -> list[dict]:
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a.get("namespace") != namespace or not a["name"].startswith(SHARD_PREFIX):
            continue
        try:
            st = _get(ray.get_actor(a["name"], namespace=namespace).stats.remote())
            out.append({"shard": a["name"].removeprefix(SHARD_PREFIX), **st})
        except Exception as exc:
            out.append({"shard": a["name"].removeprefix(SHARD_PREFIX), "error": type(exc).__name__})
    return sorted(out, key=lambda s: s["shard"])


def _depth(names: DepthControlConfig) -> dict:
    import ray

    try:
        return _get(ray.get_actor(names.name, namespace=names.namespace).stats.remote())
    except Exception as exc:
        return {"error": type(exc).__name__}


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast (ConnectionError) instead of letting ray.init retry an absent GCS for a minute."""
    if address == "auto":
        return  # ray.init finds the local cluster's address itself, or fails at once
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"address must be host:port or auto, got {address!r}")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def collect(address: str, names: DepthControlConfig | None = None) -> dict:
    """`names`: the app config's depth_control section (actor name and namespace, which the KV
    shards share); the defaults when omitted."""
    import ray

    from cluster.local import connect

    names = names or DepthControlConfig()
    if not ray.is_initialized():
        check_reachable(address)
        connect(address, names.namespace, log_to_driver=False, logging_level="ERROR")
    return {
        "nodes": _nodes(),
        "workers": _workers(),
        "kv_shards": _shards(names.namespace),
        "depth_control": _depth(names),
    }


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render(s: dict) -> str:
    lines = [f"Nodes ({sum(n['alive'] for n in s['nodes'])} alive)"]
    for n in s["nodes"]:
        state = "alive" if n["alive"] else "dead"
        lines.append(f"  {n['node_id']}  {n['address']:15} {state:5}  cpu {n['cpus']:g}  gpu {n['gpus']:g}")
    lines.append(f"Workers ({len(s['workers'])})")
    for w in s["workers"]:
        detail = f"error: {w['error']}" if "error" in w else f"{w['ongoing_requests']} requests in flight"
        lines.append(f"  {w['replica']}  {detail}")
    lines.append(f"KV shards ({len(s['kv_shards'])})")
    for sh in s["kv_shards"]:
        if "error" in sh:
            lines.append(f"  {sh['shard']}  error: {sh['error']}")
            continue
        tiers = ", ".join(
            f"{t} {sh['slots_used'].get(t, 0)}/{total} slots" for t, total in sh["slots_total"].items()
        )
        lines.append(
            f"  {sh['shard']}  {sh['blocks']} blocks, {_mib(sh['bytes_stored'])}, {sh['sessions']} sessions; "
            f"{tiers}; {sh['pinned']} pinned, {sh.get('rejected', 0)} declined"
        )
    d = s["depth_control"]
    if "error" in d:
        lines.append(f"Depth control: unreachable ({d['error']})")
    else:
        b = d["budgets"]
        lines.append(f"Depth control (started {d['starts']}x)")
        lines.append(
            f"  sessions {b['sessions']}/{b['max_sessions']}, deep {b['deep_sessions_in_flight']}/"
            f"{b['max_deep_sessions']}, ToT nodes {b['tot_nodes_in_flight']}/{b['max_tot_nodes_in_flight']}"
            f" (peak {d['peak_tot_nodes_in_flight']}), waiting for nodes {b['sessions_waiting_for_nodes']}"
        )
        lines.append(
            f"  degraded admissions {b['degraded_admissions']}, decisions "
            + (", ".join(f"{k} {v}" for k, v in sorted(d["decisions"].items())) or "none")
        )
        lines += _depth_value_lines(d.get("depth_value") or {})
    return "\n".join(lines)


def _depth_value_lines(report: dict) -> list[str]:
    """What later rounds were worth, per domain and tier, and the ceiling that comes to."""
    out = []
    for domain, tiers in sorted(report.items()):
        for tier, v in sorted(tiers.items()):
            rates = ", ".join(
                f"{k.removeprefix('round_')} {r['change_rate']:.0%}" for k, r in v["rounds"].items()
            )
            out.append(
                f"  depth value {domain}/{tier}: ceiling {v['effective_max_rounds']} ({v['reason']}); "
                f"answers changed by round: {rates}"
            )
    return out


def main(address: str, as_json: bool = False, names: DepthControlConfig | None = None) -> str:
    s = collect(address, names)
    return json.dumps(s, indent=2, default=str) if as_json else render(s)
