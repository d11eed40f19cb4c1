"""Every documented `ponder bench …` command runs, small, as a user would type it, so none can break
unnoticed (`ponder bench overhead` once did). kv, kv-path, tax and calibrate run in their own test
files, soak in test_soak_short.py; these are the ones that start a local cluster of their own."""

import json

import pytest

from cluster import cli
from cluster.models import TINY_MODEL

pytestmark = pytest.mark.e2e


def test_bench_overhead_runs_and_depth_control_decides_the_rounds(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    argv = ["bench", "overhead", "--requests", "2", "--rounds", "3", "--max-tokens", "4", "--json", str(out)]
    assert cli.main(argv) == 0  # it raises unless depth control decided rounds 1..R-1
    res = json.loads(out.read_text())
    assert res["model"] == TINY_MODEL and res["requests"] == 2 and res["rounds_per_request"] == 3
    assert res["direct_round_ms_p50"] > 0 and res["routed_round_ms_p50"] > 0
    assert isinstance(res["added_ms_p50"], float)
    assert "added per round" in capsys.readouterr().out


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
