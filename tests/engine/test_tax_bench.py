"""`ponder bench tax` end to end on the tiny model (its own in-process engine, ~30 s), and the
calibrate command's errors. Accuracy is meaningless here: the test checks the mechanics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import cli
from cluster.models import TINY_MODEL

pytestmark = pytest.mark.engine


def test_tax_bench_json_and_plots(tmp_path, capsys):
    out = tmp_path / "tax.json"
    argv = ["bench", "tax", "--json", str(out), "--model", TINY_MODEL, "--problems", "2"]
    argv += ["--max-tokens", "8", "--concurrency", "4", "--kv-cache-mib", "128", "--plots", str(tmp_path)]
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["model"] == TINY_MODEL and res["n"] == 2
    fixed = [f"fixed-{k}" for k in range(1, 7)]
    assert set(res["policies"]) == {*fixed, "tier-ceiling", "confidence-exit", "tot"}
    for m in res["policies"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["mean_tokens"] > 0 and m["mean_latency_ms"] > 0
    # fixed-k is a prefix of fixed-6: k rounds of at most 8 tokens each, growing with k
    assert [res["policies"][f]["mean_rounds"] for f in fixed] == [1, 2, 3, 4, 5, 6]
    tokens = [res["policies"][f]["mean_tokens"] for f in fixed]
    assert tokens == sorted(tokens) and tokens[-1] <= 6 * 8
    assert 0.0 <= res["token_saving_fraction"] <= 1.0
    assert -1.0 <= res["accuracy_delta"] <= 1.0 and res["accuracy_delta_unit"] == "fraction"
    assert 1 <= res["diminishing_returns_round"] <= 6
    check = res["prefix_check"]
    assert check["ok"] and len(check["runs"]) == 2
    assert all(r["answers_equal"] and r["texts_equal"] for r in check["runs"])
    assert res["timings"]["run_s"] > 0 and res["timings"]["requests"] == 2 * 3 + 2
    plots = [Path(p) for p in res["plots"]]
    assert [p.name for p in plots] == ["tax_accuracy_vs_tokens.png", "tax_accuracy_vs_rounds.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert "confidence-exit" in capsys.readouterr().out  # the table


def test_tax_bench_in_thinking_mode(tmp_path, capsys):
    """`ponder bench tax --mode thinking` on the tiny model given the thinking template: every policy
    runs, budgets are exact in thinking tokens, probes run only where they are asked for."""
    out = tmp_path / "thinking.json"
    argv = [
        "bench",
        "tax",
        "--mode",
        "thinking",
        "--json",
        str(out),
        "--model",
        TINY_MODEL,
        "--problems",
        "2",
    ]
    argv += ["--max-tokens", "8", "--segment-tokens", "8", "--kv-cache-mib", "128", "--plots", str(tmp_path)]
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "thinking" and res["config"].endswith("local-cpu-thinking.yaml")
    pol = res["policies"]
    assert set(pol) == {
        "budget-1",
        "budget-2",
        "budget-4",
        "budget-6",
        "confidence-exit",
        "probe-exit",
        "tot",
        "tier",
    }
    for k in (1, 2, 4, 6):  # exact budgets: k segments of 8 thinking tokens
        assert (
            pol[f"budget-{k}"]["mean_thinking_tokens"] == 8 * k and pol[f"budget-{k}"]["mean_segments"] == k
        )
        assert pol[f"budget-{k}"]["mean_probes"] == 0
    assert pol["probe-exit"]["mean_probes"] >= 1 and pol["confidence-exit"]["mean_probes"] == 0
    assert 1 <= pol["probe-exit"]["mean_segments"] <= 6
    tree = res["problems"][0]["runs"]["tot"]
    assert tree["tot"]["nodes"] <= 10 and tree["thinking"]["segments"] == len(tree["tot"]["best_path"])
    for m in pol.values():
        assert (
            0.0 <= m["accuracy"] <= 1.0
            and m["mean_tokens"] >= m["mean_thinking_tokens"] + m["mean_probe_tokens"]
        )
    run = res["problems"][0]["runs"]["probe-exit"]
    assert run["thinking"]["probes"] and run["thinking"]["probe_tokens"] > 0
    assert Path(res["plots"][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "probe-exit" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("domain", "message"),
    [("nope", "unknown domain 'nope'; use one of general"), ("medical", "no warm-up datasets")],
)
def test_calibrate_rejects_unknown_or_warmup_less_domains(domain, message, capsys):
    assert cli.main(["calibrate", "--domain", domain, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_calibrate_runs_and_writes_the_domain_threshold(tmp_path, capsys):
    """`ponder calibrate` end to end on the tiny model, into a copy of the configs (never the repo's)."""
    import shutil

    import yaml

    from services.config import DEFAULT_CONFIG

    configs = tmp_path / "configs"
    shutil.copytree(Path(DEFAULT_CONFIG).parent, configs)
    argv = ["calibrate", "--domain", "math", "--config", str(configs / Path(DEFAULT_CONFIG).name)]
    argv += ["--model", TINY_MODEL, "--problems", "3", "--max-tokens", "8", "--kv-cache-mib", "128"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "chosen threshold" in out and "wrote domain 'math'" in out
    math = yaml.safe_load((configs / "domains.yaml").read_text())["domains"]["math"]
    assert math["calibration"]["model"] == TINY_MODEL and math["calibration"]["n_problems"] == 3


def test_calibrate_tot_writes_the_domains_tree_of_thought_evidence(tmp_path, capsys):
    """`ponder calibrate --tot` end to end on the tiny model: the warm-up problems run as the ToT tier's
    tree and as a chain to its ceiling; the evidence lands in the domain (a copy of the configs)."""
    import shutil

    import yaml

    from services.config import DEFAULT_CONFIG

    configs = tmp_path / "configs"
    shutil.copytree(Path(DEFAULT_CONFIG).parent, configs)
    argv = ["calibrate", "--tot", "--domain", "math", "--config", str(configs / Path(DEFAULT_CONFIG).name)]
    argv += ["--model", TINY_MODEL, "--problems", "2", "--max-tokens", "8", "--kv-cache-mib", "128"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Tree-of-Thought vs a chain" in out and "wrote domain 'math' Tree-of-Thought evidence" in out
    tot = yaml.safe_load((configs / "domains.yaml").read_text())["domains"]["math"]["tot"]
    assert tot["model"] == TINY_MODEL and tot["n_problems"] == 2
    assert tot["tokens_tot"] > 0 and tot["tokens_chain"] > 0
    more, same = tot["accuracy_tot"] > tot["accuracy_chain"], tot["accuracy_tot"] == tot["accuracy_chain"]
    assert tot["pays"] == (more or (same and tot["tokens_tot"] < tot["tokens_chain"]))


@pytest.mark.parametrize("extra", [[], ["--domain", "math", "--routing"], ["--tot"]])
def test_calibrate_wants_a_domain_or_routing_not_both(extra, capsys):
    assert cli.main(["calibrate", *extra, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "give either --domain NAME" in err or "--tot measures one domain" in err


def test_calibrate_routing_fits_the_scorer_for_its_model(tmp_path, capsys):
    """`ponder calibrate --routing` end to end on the tiny model (every answer wrong, so every label
    is low and the fitted scorer routes everything low), into a copy of the configs."""
    import shutil

    from services.config import DEFAULT_CONFIG, AppConfig
    from services.reasoning.complexity import ComplexityConfig, score

    configs, out = tmp_path / "configs", tmp_path / "routing.json"
    shutil.copytree(Path(DEFAULT_CONFIG).parent, configs)
    argv = ["calibrate", "--routing", "--config", str(configs / Path(DEFAULT_CONFIG).name)]
    argv += ["--model", TINY_MODEL, "--problems", "9", "--max-tokens", "8", "--kv-cache-mib", "128"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out tier agreement" in printed and "wrote the fitted scorer" in printed
    named = AppConfig.load(configs / Path(DEFAULT_CONFIG).name).router.complexity_file  # the file written
    cfg = ComplexityConfig.load(named)  # it still validates
    cal = cfg.calibration
    assert (
        cal is not None
        and cal.model == TINY_MODEL
        and cal.prompts == len(json.loads(out.read_text())["traces"])
    )
    assert cal.labels == {"low": cal.prompts, "medium": 0, "high": 0} and cal.held_out > 0
    assert score("Design a plan: first compare 3 + 4 with 5 * 6, then schedule each step.", cfg).tier == "low"
    served, warnings = cfg.for_model("smollm2-135m-instruct")  # another model: the hand-set weights
    assert served.calibration is None and warnings
    traces = json.loads(out.read_text())["traces"]
    assert all(len(t["correct"]) == 6 for t in traces)  # each prompt ran to the high ceiling
    assert sum(t["group"] == traces[0]["group"] for t in traces) == 2  # plain and multiple-choice


def test_policy_bench_json_plot_and_reanalysis(tmp_path, capsys):
    """`ponder bench policy` on the tiny model: both formats of the same problems, every policy read
    off one chain per prompt, a verdict per format, the frontier plot; `--from` re-analyses the
    saved traces to the same numbers without an engine."""
    out = tmp_path / "policy.json"
    argv = ["bench", "policy", "--json", str(out), "--model", TINY_MODEL, "--problems", "2"]
    argv += ["--suite", "unseen", "--max-tokens", "6", "--kv-cache-mib", "128", "--plots", str(tmp_path)]
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["problems_per_format"] == 2 and len(res["traces"]) == 4
    assert [t["format"] for t in res["traces"]] == ["plain", "plain", "multiple-choice", "multiple-choice"]
    assert res["traces"][2]["group"] == res["traces"][0]["group"]  # paired across formats
    for t in res["traces"]:
        assert 4 <= len(t["rounds"]) <= 6 and all(r["completion_tokens"] <= 6 for r in t["rounds"])
    for fmt in ("plain", "multiple-choice"):
        a = res["analysis"][fmt]
        assert set(a["policies"]) == {
            "fixed-1",
            "fixed-2",
            "fixed-3",
            "fixed-4",
            "tier low",
            "tier medium",
            "default",
        }
        assert a["best_fixed"] in a["policies"] and a["best_fixed"] != "default"
        tokens = [a["policies"][f"fixed-{k}"]["mean_tokens"] for k in range(1, 5)]
        assert tokens == sorted(tokens)
        assert a["verdict"]["margin"] == 0.02 and a["verdict"]["token_ratio"]["value"] > 0
        assert set(a["default_minus"]) == set(a["policies"]) - {"default"}
        firsts = [t["rounds"][0] for t in res["traces"] if t["format"] == fmt]
        answered = sum(r["answer"] is not None for r in firsts) / len(firsts)
        assert a["first_rounds"] == {"answered": answered, "closed": 0.0}  # 6-token rounds: never closed
        assert not any(r["closed"] for t in res["traces"] for r in t["rounds"])
    plot = Path(res["plot"])
    assert plot.name == "policy_frontier_unseen.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best fixed" in capsys.readouterr().out
    again = tmp_path / "again.json"
    assert (
        cli.main(["bench", "policy", "--json", str(again), "--from", str(out), "--plots", str(tmp_path)]) == 0
    )
    assert json.loads(again.read_text())["analysis"] == res["analysis"]
