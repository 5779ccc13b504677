#!/usr/bin/env bash
# One command from a fresh checkout to a green test run: set-up (scripts/setup.sh --test), then ruff,
# the documentation site's strict build, the Triton kernels under its interpreter, and the whole test
# suite. Extra arguments go to the last
# pytest run (e.g. scripts/test.sh -k scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# the documentation site (docs/, mkdocs.yml): a broken link or anchor fails here
NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --quiet --site-dir "$(mktemp -d)"
# the Triton kernels and the engine's Triton paths under Triton's interpreter, on CPU tensors (the
# variable must be set before triton is imported, hence a run of its own; < 1 min). The main run
# compiles them for sm_80/sm_90 (tests/test_triton_aot.py) and, on a GPU, runs them natively too.
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py
"$VENV/bin/python" -m pytest "$@"
