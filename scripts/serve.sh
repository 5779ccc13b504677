#!/usr/bin/env bash
# One command from a fresh checkout to a running server on the embedded default: no Redis (in-process
# cache and job queue, training on a thread), gpt2 from the hub or, offline, the tiny model (the log
# says which). Without API keys configured, auth is off (as for `prefixserve serve`: PREFIXSERVE_AUTH
# defaults to auto) and the server listens on 127.0.0.1 only.
# Settings: PREFIXSERVE_* variables (docs/settings.md); arguments go to `prefixserve serve` (--model, --port).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${VENV:-.venv}/bin/prefixserve" serve "$@"
