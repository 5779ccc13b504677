#!/usr/bin/env bash
# One command from a fresh checkout to a green test run: creates .venv, installs PyTorch (the CPU
# build unless an NVIDIA GPU is present), the project and its test dependencies, then runs ruff and
# the whole test suite. Extra arguments go to pytest (e.g. scripts/test.sh -k scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip "torch>=2.4"
  else
    # Never the multi-GB CUDA build on a CPU machine: the +cpu wheel (from a local wheel directory
    # or a configured index), else PyTorch's own CPU index.
    pip "torch==2.13.0+cpu" 2>/dev/null \
      || pip "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip -e ".[test]" -e ./client

# A real redis-server for the tests that need one (they start it on a free port unless REDIS_URL is set).
if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  elif command -v brew >/dev/null 2>&1; then
    brew install redis
  else
    echo "redis-server is needed by the tests: install it, or set REDIS_URL" >&2; exit 1
  fi
fi

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$py" -m pytest "$@"
