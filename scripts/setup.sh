#!/usr/bin/env bash
# Idempotent set-up into .venv: PyTorch (the CPU build unless an NVIDIA GPU is present; never the
# multi-GB CUDA build on a CPU machine), the server and the SDK. With --test: the test dependencies,
# a redis-server and Debian's chromium for the tests that need them.
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
  pip -e ".[test,ray]" -e "./client[plot]"  # ray: tests/test_ray.py (a local cluster), bench/scale.py
  # system packages: a redis-server (the tests start and kill their own) and Debian's chromium (the
  # console's browser tests drive it through Playwright; Playwright's own browser download is not used)
  need=()
  [ -n "${REDIS_URL:-}" ] || command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  [ -n "${PREFIXSERVE_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if [ -n "$sudo" ] && ! sudo -n true 2>/dev/null && ! command -v brew >/dev/null 2>&1; then
      echo "The tests need ${need[*]}. Installing needs root here: install them yourself" >&2
      echo "  (apt-get install ${need[*]}; for Redis alternatively set REDIS_URL=redis://127.0.0.1:6379/15" >&2
      echo "  to a Redis the tests may flush, and then the few tests that kill Redis are skipped) and rerun." >&2
      exit 1
    fi
    if command -v apt-get >/dev/null 2>&1; then
      $sudo apt-get update -qq
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    elif command -v brew >/dev/null 2>&1; then  # macOS: Chromium is a cask; point PREFIXSERVE_CHROMIUM at it
      [[ " ${need[*]} " != *" redis-server "* ]] || brew install redis
      [[ " ${need[*]} " != *" chromium "* ]] || { brew install --cask chromium && echo \
        "set PREFIXSERVE_CHROMIUM=/Applications/Chromium.app/Contents/MacOS/Chromium for the console tests" >&2; }
    else
      echo "the tests need ${need[*]}: install them (or set REDIS_URL for Redis)" >&2; exit 1
    fi
  fi
else
  pip -e . -e ./client
fi
