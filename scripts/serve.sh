#!/usr/bin/env bash
# One command from a fresh checkout to a running server on the embedded default: no Redis (in-process
# cache and job queue, training on a thread), gpt2 from the hub or, offline, the tiny model (the log
# says which). Without API keys configured, auth is off and the server listens on 127.0.0.1 only.
# Settings: PREFIXSERVE_* variables (README); arguments go to `prefixserve serve` (--model, --port).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${PREFIXSERVE_API_KEYS:-}${PREFIXSERVE_API_KEYS_FILE:-}" ]; then
  export PREFIXSERVE_AUTH=${PREFIXSERVE_AUTH:-false}
fi
exec "${VENV:-.venv}/bin/prefixserve" serve "$@"
