"""Every documented `ponder bench …` command runs, small, as a user would type it, so none can break
unnoticed (`ponder bench overhead` once did). kv, kv-path, tax and calibrate run in their own test
files, soak in test_soak_short.py; these are the ones that start a local cluster of their own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from cluster.models import TINY_MODEL

pytestmark = pytest.mark.e2e
PONDER = str(Path(sys.executable).with_name("ponder"))  # the venv's console script


def test_bench_overhead_runs_and_the_router_decides_the_rounds(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    argv = ["bench", "overhead", "--requests", "2", "--rounds", "3", "--max-tokens", "4", "--keys"]
    assert cli.main([*argv, "--json", str(out)]) == 0  # raises unless the router decided every round
    res = json.loads(out.read_text())
    assert res["model"] == TINY_MODEL and res["requests"] == 2 and res["rounds_per_request"] == 3
    assert res["direct_round_ms_p50"] > 0 and res["routed_round_ms_p50"] > 0
    assert isinstance(res["added_ms_p50"], float) and res["api_keys"] is None
    keyed = res["with_keys"]  # a second cluster with a keys file: every request sent its key
    assert keyed["api_keys"]["limits"]["requests_per_minute"] > 0 and keyed["routed_round_ms_p50"] > 0
    assert res["keys_added_ms_p50"] == pytest.approx(keyed["added_ms_p50"] - res["added_ms_p50"])
    printed = capsys.readouterr().out
    assert "added per round" in printed and "with a key and its limits" in printed


def test_bench_observe_scrapes_ponder_series_and_draws_them(tmp_path):
    out, png = tmp_path / "observe.json", tmp_path / "observe.png"
    argv = [
        "bench",
        "observe",
        "--requests",
        "3",
        "--concurrency",
        "2",
        "--json",
        str(out),
        "--png",
        str(png),
    ]
    assert cli.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(out.read_text())
    assert res["requests"] == 3 and res["status_codes"] == {"200": 3}
    finished = sum(v for k, v in res["final"].items() if k.startswith("ray_ponder_requests_total{"))
    assert finished >= 3  # the series the picture draws were really scraped


def test_bench_control_counts_the_actor_s_calls_and_router_verdicts_wait_for_none(tmp_path):
    # As a user runs it, in a process of its own: it instantiates the router in-process, and a Ray
    # handle of its cluster left in this one would abort the next cluster's deploy.
    out = tmp_path / "control.json"
    argv = [
        "bench",
        "control",
        "--sessions",
        "1,4",
        "--rounds",
        "3",
        "--min-requests",
        "4",
        "--json",
        str(out),
    ]
    run = subprocess.run([PONDER, *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    router, actor = res["by_mode"]["router"], res["by_mode"]["actor"]
    assert [x["sessions"] for x in res["levels"]] == [1, 4]
    assert all(x["failures"] == 0 for x in router + actor)
    assert res["actor_calls_per_request"] == 2.0  # admit and finish, counted by the actor
    assert all(x["actor_calls_per_request"] == 4.0 for x in actor)  # + a verdict for rounds 1 and 2
    assert max(x["added_ms_p99"] for x in router) < min(x["added_ms_p50"] for x in actor)
    assert res["actor_sessions_per_s"] > 0
    tot = res["tot"]  # Tree-of-Thought: node leases, not a call per expansion
    assert tot["expansions_per_request"] >= 2 and tot["actor_calls_per_request"] <= tot["bound_per_request"]
    assert "verdict wait per round" in run.stdout
