#!/usr/bin/env bash
# The GPU measurement of the KV data path (issue 13), prepared for a lent GPU machine, which has
# torch, transformers, numpy and msgpack but no vLLM, no Ray and no internet:
#   here, once:   bash scripts/gpu_kv_path.sh wheels      # the wheels it lacks, into .whl/ (~3 MB)
#   device tool:  run(command="bash scripts/gpu_kv_path.sh run", carry=[".whl"], timeout_s=540)
# It writes $OUT/kv_path_llama8b.json and $OUT/kv_path.log (ponder bench kv-path, Llama-3.1-8B
# shape, 2k/8k/32k tokens, restore vs a random-init prefill); record device, command and numbers in
# docs/benchmarks.md. DEVICE=cpu runs the same steps here, as a rehearsal.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(xxhash==4.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5)

case "${1:-}" in
wheels)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  rm -rf .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -la .whl
  ;;
run)
  OUT=${OUT:-/tmp/kv-path-out}
  mkdir -p "$OUT"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  "$PY" -m bench.kv_path --device "${DEVICE:-cuda}" --shape llama-8b ${TOKENS:+--tokens "$TOKENS"} \
    --json "$OUT/kv_path_llama8b.json" 2>&1 | tee "$OUT/kv_path.log"
  ;;
*)
  echo "usage: bash scripts/gpu_kv_path.sh wheels|run" >&2
  exit 2
  ;;
esac
