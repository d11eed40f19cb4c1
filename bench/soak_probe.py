"""What the sustained-load run reads from a running cluster (thin shell; the checks are in
bench/soak_stats.py): each Ponder process's memory, KV shards' and depth control's accounting
(`cluster/status.py`), vLLM's engine gauges from Ray's metrics port, the workers' engine stats.

Memory is asked of each process itself (`__ray_call__` runs a function on the actor), so it works
wherever the actor runs; a worker replica also reports its children (vLLM's engine-core process).
"""

from __future__ import annotations

import os

from kvstore.shard.client import SHARD_PREFIX
from kvstore.shard.keeper import keeper_name
from services.config import DepthControlConfig

TIMEOUT_S = 10.0
SERVE_NAMESPACE = "serve"
VLLM_GAUGES = {  # vLLM metric (Ray prefix) -> key; summed over workers (usage: the largest)
    "ray_vllm_kv_cache_usage_perc": "kv_cache_usage",
    "ray_vllm_num_requests_running": "requests_running",
    "ray_vllm_num_requests_waiting": "requests_waiting",
}


def role_of(name: str, namespace: str, names: DepthControlConfig) -> str | None:
    """A Ponder process's role from its named actor; None for actors that are not Ponder's.
    `names`: the app config's depth_control section (its actor's name; its namespace, the shards')."""
    if namespace == SERVE_NAMESPACE:
        if name == "SERVE_CONTROLLER_ACTOR":
            return "serve-controller"
        if name.startswith("SERVE_PROXY_ACTOR"):
            return "serve-proxy"
        for deployment, role in (("#Router#", "router"), ("#ReasoningWorker#", "worker")):
            if deployment in name:
                return role
        return None
    if namespace != names.namespace:
        return None
    if name.startswith(SHARD_PREFIX):
        return "kv-shard"
    singles = {names.name: "depth-control", names.records_name: "control-records"}
    singles[keeper_name(names.namespace)] = "kv-keeper"
    return singles.get(name)


def ponder_actors(names: DepthControlConfig) -> list[tuple[str, str, str]]:
    """(key, name, namespace) of every live Ponder actor; the key is its role plus a short id."""
    import ray

    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        role = role_of(a["name"], a.get("namespace", ""), names)
        if role is None:
            continue
        tail = a["name"].rsplit("#", 1)[-1] if "#" in a["name"] else a["name"].rsplit("-", 1)[-1]
        single = ("serve-controller", "depth-control", "control-records", "kv-keeper")
        key = role if role in single else f"{role}:{tail[:8]}"
        out.append((key, a["name"], a.get("namespace", "")))
    return sorted(out)


def own_memory(_actor: object = None) -> dict:
    """Runs inside the actor: its RSS and its children's (vLLM's engine core under a worker)."""
    import psutil

    me = psutil.Process(os.getpid())
    children = []
    for c in me.children(recursive=True):
        try:
            name = "mp-resource-tracker" if "resource_tracker" in " ".join(c.cmdline()) else c.name()
            children.append({"pid": c.pid, "name": name, "rss": c.memory_info().rss})
        except psutil.Error:  # exited meanwhile
            continue
    return {"pid": me.pid, "rss": me.memory_info().rss, "children": children}


def memory(actors: list[tuple[str, str, str]]) -> dict[str, dict]:
    """{key: {"pid", "rss"}} for each actor and each of its child processes (key/child-name)."""
    import ray

    refs = {
        key: ray.get_actor(name, namespace=ns).__ray_call__.remote(own_memory) for key, name, ns in actors
    }
    out: dict[str, dict] = {}
    for key, ref in refs.items():
        try:
            m = ray.get(ref, timeout=TIMEOUT_S)
        except Exception:  # restarting or gone: missing from this sample (a restart shows as a new pid)
            continue
        out[key] = {"pid": m["pid"], "rss": m["rss"]}
        for c in m["children"]:
            name = "engine-core" if "EngineCore" in c["name"] else c["name"]
            out[f"{key}/{name}"] = {"pid": c["pid"], "rss": c["rss"]}
    return out


def cluster_state(address: str, names: DepthControlConfig) -> dict:
    """KV shards' stats and depth control's, as `ponder status` collects them (without the
    per-shard event counters, which only grow)."""
    from cluster.status import collect

    s = collect(address, names)
    shards = [{k: v for k, v in sh.items() if k != "events"} for sh in s["kv_shards"]]
    return {"kv_shards": shards, "depth_control": s["depth_control"], "workers": s["workers"]}


def vllm_gauges(metrics_port: int) -> dict:
    """vLLM's KV cache usage (0..1) and running/waiting requests from Ray's metrics endpoint;
    a gauge no worker exports right now is absent."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    body = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            key = VLLM_GAUGES.get(s.name)
            if key is None:
                continue
            out[key] = (
                max(out.get(key, 0.0), s.value) if key == "kv_cache_usage" else out.get(key, 0.0) + s.value
            )
    return out


def engine_stats(app_name: str, replicas: int) -> dict:
    """Unfinished requests summed over the worker replicas (asked `replicas` times through the
    deployment handle; a replica asked twice is counted once)."""
    from ray import serve

    handle = serve.get_deployment_handle("ReasoningWorker", app_name=app_name)
    seen: dict[str, int] = {}
    for _ in range(max(1, replicas) * 3):
        r = handle.engine_stats.remote().result(timeout_s=TIMEOUT_S)
        seen[r["replica"]] = r["unfinished_requests"] or 0
        if len(seen) >= replicas:
            break
    return {"unfinished_requests": sum(seen.values()), "replicas_asked": len(seen)}


def state_file_bytes(state_dir: str | None) -> dict | None:
    """Sizes of depth control's SQLite file and its write-ahead log, when they are on this machine
    (the log is reused after each checkpoint: its size is bounded; the file's grows with requests)."""
    from services.control.records import STATE_FILE

    if not state_dir or not os.path.exists(os.path.join(state_dir, STATE_FILE)):
        return None
    path = os.path.join(state_dir, STATE_FILE)
    wal = path + "-wal"
    return {"db": os.path.getsize(path), "wal": os.path.getsize(wal) if os.path.exists(wal) else 0}
