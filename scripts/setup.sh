#!/usr/bin/env bash
# Idempotent set-up into .venv: PyTorch (the CPU build unless an NVIDIA GPU is present; never the
# multi-GB CUDA build on a CPU machine), the server and the SDK. With --test: the test dependencies
# and a redis-server for the tests that need one.
# Every package is installed at the version requirements/lock.txt pins (the tested set; refresh it
# with scripts/lock.sh). CONSTRAINTS= (empty) resolves the newest releases within pyproject's bounds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS-requirements/lock.txt}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
locked=()
[ -z "$CONSTRAINTS" ] || locked=(-c "$CONSTRAINTS")
pip() { "$py" -m pip install --disable-pip-version-check -q ${locked[@]+"${locked[@]}"} "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  torch=""  # the locked release
  [ -z "$CONSTRAINTS" ] || torch=$(sed -n 's/^torch==//p' "$CONSTRAINTS")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip "torch${torch:+==$torch}"  # PyPI's Linux build is the CUDA one
  else
    # the +cpu wheel (from a local wheel directory or a configured index), else PyTorch's CPU index
    pip "torch==${torch:-2.13.0}+cpu" 2>/dev/null \
      || pip "torch==${torch:-2.13.0}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

if [ "${1:-}" = "--test" ]; then
  pip -e ".[test,ray]" -e ./client  # ray: tests/test_ray.py (a local cluster), bench/scale.py
  if [ -z "${REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if [ -n "$sudo" ] && ! sudo -n true 2>/dev/null && ! command -v brew >/dev/null 2>&1; then
      echo "The tests need a redis-server (they start and kill their own). Installing one needs root here:" >&2
      echo "  install it yourself (apt-get install redis-server, dnf install redis, brew install redis)," >&2
      echo "  or point REDIS_URL at a Redis the tests may flush (e.g. REDIS_URL=redis://127.0.0.1:6379/15)" >&2
      echo "  and rerun; then the few tests that kill and restart Redis are skipped." >&2
      exit 1
    fi
    if command -v apt-get >/dev/null 2>&1; then
      $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    elif command -v brew >/dev/null 2>&1; then
      brew install redis
    else
      echo "redis-server is needed by the tests: install it, or set REDIS_URL" >&2; exit 1
    fi
  fi
else
  pip -e . -e ./client
fi
