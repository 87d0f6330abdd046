#!/usr/bin/env bash
# GPU benchmark (one short run, under 10 minutes): SD1.5-shaped UNet with random weights at 512 px, fp16 + bf16.
# Usage: bash bench/gpu.sh [OUT.json]      (needs torch with CUDA and diffusers; nothing is downloaded)
# If diffusers is missing and a folder .whl/ with its wheel exists, it is installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results_gpu.json}
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "diffusers is not installed (pip install diffusers)" >&2; exit 2
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 bench/gpu_checks.py
PYTHONUNBUFFERED=1 python3 bench/bench_gpu.py --out "$OUT"
