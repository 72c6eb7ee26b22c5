#!/usr/bin/env bash
# Sets everything up, then runs the linters and the whole test suite (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${KNOWLENS_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$VENV/bin/ruff" check knowlens tests benchmarks
"$VENV/bin/lint-imports"
"$VENV/bin/pyright" --pythonpath "$VENV/bin/python" knowlens
"$VENV/bin/python" -m pytest -q "$@"
