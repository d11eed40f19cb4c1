#!/usr/bin/env bash
# System packages the tests use, from Debian: `prometheus` (the server scrapes a live cluster in
# tests/e2e/test_prometheus_dashboard.py; promtool checks and unit-tests the chart's alert rules) and
# `chromium` (headless: the Ray dashboard in a real browser, `ponder screenshots`). Idempotent; needs
# root (or sudo) the first time.
set -euo pipefail
missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
[[ ${#missing[@]} -eq 0 ]] && exit 0
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
echo "==> installing Debian packages: ${missing[*]} (first time only)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
  { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
for tool in promtool prometheus chromium; do
  command -v "$tool" >/dev/null || { echo "error: $tool is still missing after apt-get install" >&2; exit 1; }
done
