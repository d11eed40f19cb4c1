"""The chart's alerts (deploy/helm/ponder/alerts/ponder-rules.yaml) with Prometheus's own promtool
(Debian's `prometheus` package; scripts/system-deps.sh installs it): the rule file is valid, and
its unit tests prove each alert fires on series that should trip it and stays quiet otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "ponder" / "alerts"


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run `bash scripts/system-deps.sh` (apt-get install prometheus)"
    return subprocess.run([exe, *args], cwd=ALERTS, capture_output=True, text=True, timeout=120)


def test_the_rule_file_is_valid():
    r = promtool("check", "rules", "ponder-rules.yaml")
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, r.stdout + r.stderr


def test_every_alert_fires_when_it_should_and_stays_quiet_otherwise():
    r = promtool("test", "rules", "ponder-rules.test.yaml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    rules = yaml.safe_load((ALERTS / "ponder-rules.yaml").read_text())
    alerts = {x["alert"] for g in rules["groups"] for x in g["rules"]}
    tests = yaml.safe_load((ALERTS / "ponder-rules.test.yaml").read_text())["tests"]
    tested = {c["alertname"] for t in tests for c in t["alert_rule_test"]}
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert alerts == tested == fired == quiet  # every alert both fires and stays quiet in a test


def test_a_broken_expectation_fails(tmp_path):
    """The tests can fail: an alert expected at a time it cannot fire makes promtool fail."""
    tests = yaml.safe_load((ALERTS / "ponder-rules.test.yaml").read_text())
    tests["rule_files"] = [str(ALERTS / "ponder-rules.yaml")]
    case = tests["tests"][0]["alert_rule_test"][0]  # depth control, 20 minutes in: quiet
    case["exp_alerts"] = [{"exp_labels": {"severity": "critical"}}]
    path = tmp_path / "broken.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    r = promtool("test", "rules", str(path))
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr and "got:[]" in r.stderr
