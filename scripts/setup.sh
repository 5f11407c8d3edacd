#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs geomoe with its dev tools. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[torch,simulation,dev,export]"
