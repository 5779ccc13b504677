#!/usr/bin/env bash
# One command from a fresh checkout to a green test run: set-up (scripts/setup.sh --test), then ruff
# and the whole test suite. Extra arguments go to pytest (e.g. scripts/test.sh -k scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest "$@"
