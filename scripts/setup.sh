#!/usr/bin/env bash
# Sets up knowlens in a virtual environment (default ./.venv; KNOWLENS_VENV=path to use another,
# e.g. an environment that already has a CUDA torch: that torch is kept).
# torch is installed only when the environment has none; here that takes the local CPU wheel torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KNOWLENS_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "knowlens setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "knowlens setup: installing torch==${KNOWLENS_TORCH:-2.13.0}"
  "$VENV/bin/pip" install -q "torch==${KNOWLENS_TORCH:-2.13.0}"
fi
echo "knowlens setup: installing knowlens with the dev extra"
"$VENV/bin/pip" install -q -e ".[dev]"
