#!/usr/bin/env bash
# All tests, the Flower simulation and `flwr run` ones included, in the repo's .venv (created and
# installed with the dev extras when missing):  bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv dev
export FLWR_TELEMETRY_ENABLED=0

status=0
"$VENV_BIN/python" -m pytest "$@" || status=$?
if [[ $status == 5 ]]; then
    # pytest's "no tests collected" must not read as a pass (e.g. a wrong path or -m filter).
    echo "error: pytest collected no tests (exit 5)" >&2
fi
exit "$status"
