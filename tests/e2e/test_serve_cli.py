"""`ponder serve` as a user runs it: starts, answers, and on SIGTERM stops everything, Ray included."""

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import yaml

from cluster.local import free_port
from cluster.models import TINY_MODEL, ensure_model
from services.config import DEFAULT_CONFIG

pytestmark = pytest.mark.e2e


def _config(tmp_path: Path, port: int) -> Path:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["engine"].update(model=TINY_MODEL, kv_cache_memory_bytes=64 << 20, max_model_len=1024)
    raw["depth_control"]["tiers_file"] = str(DEFAULT_CONFIG.parent / "tiers.yaml")
    raw["router"]["complexity_file"] = str(DEFAULT_CONFIG.parent / "complexity.yaml")
    raw["depth_control"]["domains_file"] = str(DEFAULT_CONFIG.parent / "domains.yaml")
    raw["depth_control"]["state_dir"] = str(tmp_path / "state")
    raw["ray"].update(dashboard=True, dashboard_port=free_port(), metrics_export_port=free_port())
    raw["http"]["port"] = port
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def config_port(config: Path, key: str) -> int:
    return yaml.safe_load(config.read_text())["ray"][key]


def _wait_ready(proc: subprocess.Popen, deadline: float) -> list[str]:
    lines = []
    for line in proc.stdout:  # ends when the process exits
        lines.append(line)
        if "Ponder is serving" in line:
            return lines
        if time.monotonic() > deadline:
            break
    raise AssertionError("ponder serve did not become ready:\n" + "".join(lines))


def _start(config: Path) -> tuple[subprocess.Popen, list[str]]:
    ponder = Path(sys.executable).with_name("ponder")
    proc = subprocess.Popen(
        [str(ponder), "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    try:
        return proc, _wait_ready(proc, time.monotonic() + 300)
    except BaseException:
        proc.kill()
        raise


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _listening(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every socket `ponder serve` and its descendants listen on
    (TCP) or have bound (UDP)."""
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            name, conns = p.name(), p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr):
                out.append((name, c.laddr.ip, c.laddr.port))
    return out


# Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0", hard-coded
# (ray/serve/_private/replica.py); Ray's token auth guards it (docs/security.md).
SERVE_REPLICA = "ray::ServeReplica"


def _unauthenticated_call(port: int) -> grpc.StatusCode:
    """A pickled-request method of a Serve replica's gRPC server, called without Ray's token."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    return rest


def test_serve_answers_then_sigterm_stops_ray_and_reviews_survive_a_restart(tmp_path):
    ensure_model(TINY_MODEL)
    port = free_port()
    config = _config(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    proc, lines = _start(config)
    try:
        assert any(f"{url}/v1" in ln for ln in lines)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in descendants if p.is_running())
        body = {
            "model": TINY_MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "temperature": 0,
            "reasoning": {"tier": "low", "max_rounds": 2},
        }
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert 1 <= len(resp.json()["reasoning"]["rounds"]) <= 2
        # a critical answer is held for review (202) ...
        held = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            json=body | {"reasoning": {"tier": "critical", "max_rounds": 1}},
        )
        assert held.status_code == 202, held.text
        review_id = held.json()["id"]

        rest = _stop(proc)
        assert "stopped." in rest
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, [p.cmdline()[:2] for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
    # ... and is still pending after the whole server restarted, then released on approval
    proc, _ = _start(config)
    try:
        # Nothing but loopback, save one token-guarded port per Serve replica that Ray cannot bind
        sockets = _listening(psutil.Process(proc.pid))
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= names, sockets  # the list is real
        assert any(port == int(config_port(config, "dashboard_port")) for _, _, port in sockets), sockets
        exposed = [s for s in sockets if not _loopback(s[1])]
        replicas = [s for s in exposed if s[0].startswith(SERVE_REPLICA) and s[1] in ("::", "0.0.0.0")]
        assert exposed == replicas, f"listening beyond loopback: {sorted(set(exposed) - set(replicas))}"
        per_process = [s[0] for s in replicas]
        assert len(per_process) == 2 and len(set(per_process)) == 2, replicas  # router + worker, one each
        for _, _, replica_port in replicas:  # ... and a call without Ray's token is refused
            assert _unauthenticated_call(replica_port) == grpc.StatusCode.UNAUTHENTICATED
        got = httpx.get(f"{url}/v1/reviews/{review_id}", timeout=60).json()
        assert got["status"] == "pending" and got["completion"] is None
        approved = httpx.post(f"{url}/v1/reviews/{review_id}/approve", timeout=60)
        assert approved.status_code == 200, approved.text
        assert approved.json()["completion"]["choices"][0]["message"]["content"] == got["proposed"]["content"]
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
