#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs geomoe with its dev tools. Safe to rerun. pip's own output goes to
# .venv/install.log and is shown only if the install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "installing geomoe and its dependencies into .venv (the first time takes a few minutes; log: .venv/install.log)" >&2
if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
       && .venv/bin/python -m pip install --quiet -e ".[torch,simulation,dev,export]"; } >.venv/install.log 2>&1; then
  tail -n 40 .venv/install.log >&2
  echo "setup failed: the whole log is .venv/install.log" >&2
  exit 1
fi
