#!/usr/bin/env bash
# The NanoGPT run's check on one GPU (about 8 minutes on an H100), or --cpu-smoke on a CPU: see
# scripts/gpu_check.py. Uses the project's virtual environment when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$PYTHON" scripts/gpu_check.py "$@"
