#!/usr/bin/env bash
# Installs duet into .venv if needed, then serves the embedded default model
# (SmolLM2-135M-Instruct) on 127.0.0.1:8000. Extra arguments go to `duet serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/duet serve --host 127.0.0.1 --port 8000 "$@"
