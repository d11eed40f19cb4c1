"""`ponder bench kv` runs small: every key of the issue is a number, or null with the reason."""

import json

import pytest

from bench.kv_serve import reuse_of
from cluster import cli

pytestmark = pytest.mark.engine  # starts Ray and NIXL for nixl_vs_memcpy


def test_bench_kv_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    argv = ["bench", "kv", "--json", str(out), "--blocks", "4", "--repeats", "1", "--no-serve"]
    assert cli.main([*argv, "--nixl-sizes", "4", "--nixl-repeats", "2"]) == 0
    res = json.loads(out.read_text())
    assert res["codec_vs_memcpy"] > 0 and res["ram_put_get_vs_memcpy"] > 0
    assert 0 < res["store_waste_fraction"] < 0.04
    assert res["nixl_vs_memcpy"] > 0  # nixl-cu12 is pinned: NIXL runs here
    for key in (
        "restore_vs_recompute_speedup_2k",
        "restore_vs_recompute_speedup_2k_ray",
        "prefix_reuse_fraction",
        "serving_throughput_store_on_vs_off",
    ):
        assert res[key] is None and "--no-serve" in res["not_measured"][key]
    assert "codec encode+decode" in capsys.readouterr().out


def test_prefix_reuse_counts_shared_prefix_of_later_rounds():
    r = {
        "worker": "a",
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "kv_cached_tokens": 0,
        "kv_loaded_tokens": 0,
    }
    r2 = {
        "worker": "b",
        "prompt_tokens": 150,
        "completion_tokens": 20,
        "kv_cached_tokens": 32,
        "kv_loaded_tokens": 64,
    }
    r3 = {
        "worker": "b",
        "prompt_tokens": 200,
        "completion_tokens": 9,
        "kv_cached_tokens": 160,
        "kv_loaded_tokens": 0,
    }
    res = reuse_of([[r, r2, r3]])
    assert res["shared_prefix_tokens"] == 120 + 170
    assert res["prefix_reuse_fraction"] == round((96 + 160) / 290, 4)
    assert (
        res["from_store"] == round(64 / 290, 4) and res["worker_switches"] == 1 and res["later_rounds"] == 2
    )
    assert reuse_of([[r]])["prefix_reuse_fraction"] is None


def test_the_served_measurements_start_on_a_state_folder_of_their_own():
    """The served part (`ponder bench kv` without --no-serve) starts the app with this config: depth
    control must find its state file there (a None state_dir once failed every served run), and it
    is never the user's."""
    from bench.kv_serve import serve_cfg
    from services.config import ponder_home
    from services.control.records import state_path

    cfg = serve_cfg(store=True, workers=2)
    path = state_path(cfg.depth_control)
    assert path.parent.is_dir() and not path.is_relative_to(ponder_home())
