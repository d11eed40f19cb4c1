"""`ponder bench kv` runs small and reports every key of the issue, unmeasured ones as null + why."""

import json

from cluster import cli


def test_bench_kv_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    assert cli.main(["bench", "kv", "--json", str(out), "--blocks", "4", "--repeats", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["codec_vs_memcpy"] > 0 and res["ram_put_get_vs_memcpy"] > 0
    assert 0 < res["store_waste_fraction"] < 0.04
    for key in ("restore_vs_recompute_speedup_2k", "prefix_reuse_fraction", "nixl_vs_memcpy"):
        assert res[key] is None and res["not_measured"][key]
    assert "codec encode+decode" in capsys.readouterr().out
