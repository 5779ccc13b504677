#!/usr/bin/env bash
# The prepared device check (bench/gpu_check.py says what it runs): on a machine with an NVIDIA GPU and
# its own torch (CUDA build) and Triton, from the repository root:
#   bench/gpu_check.sh [--out bench/results/gpu-check.json] [--only cuda_tests,aot,engine,serve]
# It installs this package alone (no dependencies: nothing the machine lacks is fetched; the lock's
# versions are what the check expects), then runs the steps within about 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import prefixserve" 2>/dev/null \
  || "$PYTHON" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e . -e ./client
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
