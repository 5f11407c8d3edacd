#!/usr/bin/env bash
# Sets up .venv and runs the test suite, all but the Docker tier (real containers, about 7 minutes:
# `bash scripts/test.sh -m docker`; .ci/run runs both). Extra arguments go to pytest; a later -m replaces this one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not docker" "$@"
