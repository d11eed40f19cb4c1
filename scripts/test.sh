#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up (idempotent), models, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/system-deps.sh
.venv/bin/ponder models pull smollm2-135m-instruct
.venv/bin/ponder models pull tiny-random-llama
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
