"""`ponder bench depth-value` smoke run: the real depth-control class over replayed and scripted rounds
(in-process, its SQLite state in a temporary folder; ~2 s)."""

from __future__ import annotations

import json

from cluster import cli


def test_depth_value_bench_converges_where_rounds_change_nothing_and_keeps_the_ceiling_elsewhere(
    tmp_path, capsys
):
    out = tmp_path / "dv.json"
    assert cli.main(["bench", "depth-value", "--json", str(out), "--requests", "120"]) == 0
    res = json.loads(out.read_text())
    runs = {(r["source"], r["tier"]): r for r in res["runs"]}
    assert (
        res["real_source"]["answer_changes"] == 0
    )  # the recorded model's later rounds never changed an answer
    for tier in ("medium", "high"):
        real, scripted = runs[("real", tier)], runs[("scripted", tier)]
        assert real["final_ceiling"] == real["floor"] and real["reached_floor_at_request"] <= 60
        assert real["mean_rounds_last_50"] < real["mean_rounds_first_50"] == real["ceiling"]
        assert (
            scripted["final_ceiling"] == scripted["ceiling"] and scripted["reached_floor_at_request"] is None
        )
    assert "floor reached at" in capsys.readouterr().out
    assert cli.main(["bench", "depth-value", "--requests", "0"]) == 2
