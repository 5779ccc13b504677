#!/usr/bin/env bash
# Refresh requirements/lock.txt, the tested dependency set that every install path uses
# (scripts/setup.sh, hence serve.sh, test.sh and CI; the Dockerfile and the compose images):
#   1. a scratch venv (.venv-lock) gets the newest releases within pyproject.toml's bounds, held back
#      only by requirements/pins.txt (each pin says why);
#   2. ruff and the whole test suite run there (scripts/test.sh; extra arguments go to pytest);
#   3. only if they pass is the lock rewritten from what that venv holds. Review and commit the diff.
# When they fail, the lock is left as it was and .venv-lock stays for a look at the newest set.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=.venv-lock CONSTRAINTS=requirements/pins.txt
rm -rf "$VENV"
scripts/setup.sh --test
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" -e ".[bench]"
log=$(mktemp)
if ! scripts/test.sh "$@" 2>&1 | tee "$log"; then
  echo "lock.sh: the newest set fails the tests (above); requirements/lock.txt is unchanged." >&2
  echo "lock.sh: it is in $VENV ($VENV/bin/pip freeze); hold a package back in $CONSTRAINTS." >&2
  exit 1
fi
summary=$(grep -E '[0-9]+ passed' "$log" | tail -1 | grep -oE '[0-9]+ (passed|skipped|xfailed|xpassed)' | paste -sd, - | sed 's/,/, /g')
platform=$("$VENV/bin/python" -c 'import platform as p; print("Python", p.python_version(), p.system(), p.machine())')
{
  echo "# The tested dependency set: scripts/setup.sh, the Dockerfile and the compose images install"
  echo "# with '-c requirements/lock.txt'. Written by scripts/lock.sh (do not edit by hand; held-back"
  echo "# packages go in requirements/pins.txt) on $(date -u +%Y-%m-%d), $platform,"
  echo "# after scripts/test.sh passed with it: $summary."
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -v -e '^prefixserve' -e '^-e ' | sed 's/+cpu$//' | LC_ALL=C sort -f
} > requirements/lock.txt
echo "lock.sh: requirements/lock.txt written ($summary); review it with git diff and commit it."
