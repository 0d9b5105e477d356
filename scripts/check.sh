#!/usr/bin/env bash
# Developer check before a commit: lint, format, types, fast tests (no Flower simulation).
#   bash scripts/check.sh            # `bash scripts/test.sh` runs everything
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv dev

"$VENV_BIN/ruff" check .
"$VENV_BIN/ruff" format --check .
"$VENV_BIN/mypy"                            # the packages listed in pyproject
"$VENV_BIN/mypy" scripts/flwr_local.py
"$VENV_BIN/python" -m pytest -q -m "not slow and not simulation"
