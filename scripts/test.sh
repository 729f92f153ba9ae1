#!/usr/bin/env bash
# Installs duet with its test extras into .venv if needed, lints, then runs the test suite.
# Extra arguments go to pytest. The 25 slowest tests are listed at the end (the suite has a
# 20-minute budget).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -rs --durations=25 "$@"
