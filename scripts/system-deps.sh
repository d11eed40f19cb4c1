#!/usr/bin/env bash
# System packages the tests use, from Debian: promtool (package `prometheus`) checks and unit-tests
# the chart's alert rules (tests/unit/test_alerts.py). Idempotent; needs root (or sudo) the first time.
set -euo pipefail
command -v promtool >/dev/null && exit 0
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
echo "==> installing Debian's prometheus package (promtool)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 ||
  { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
command -v promtool >/dev/null || { echo "error: promtool is still missing after installing prometheus" >&2; exit 1; }
