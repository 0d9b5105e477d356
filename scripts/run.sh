#!/usr/bin/env bash
# Quickstart: HFSL fine-tuning on a managed local Flower SuperLink (simulation engine).
#
#   bash scripts/run.sh                                   # 5 rounds, 4 client clusters, digits
#   bash scripts/run.sh --run-config "num-rounds=10 lr=0.1"   # any extra `flwr run` arguments
#
#   GAISNET_CLIENT_GPUS=0.25 bash scripts/run.sh          # on a GPU: 4 clusters share it
#   GAISNET_CLIENT_CPUS=0.5 bash scripts/run.sh           # 2 clusters per core (Ray is told of
#                                                         # 2x the cores: init-args-num-cpus)
#   RAY_ADDRESS=HEAD:6379 bash scripts/run.sh             # on an existing Ray cluster
#
# Environment: GAISNET_CLUSTERS (4) simulated client clusters; GAISNET_CLIENT_CPUS (1) and
# GAISNET_CLIENT_GPUS (0) Ray resources per cluster (client-resources-num-cpus / -num-gpus; a
# fraction of a GPU lets several clusters share one, and device='auto' then puts each cluster's
# chain on the GPU Ray gave it; the ServerApp's evaluation and the cloud's pre-training use the
# GPU too when one is present); GAISNET_OUTPUT_DIR (outputs/<time>);
# FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (39191) and FLWR_LOCAL_CONTROL_API_PORT (39193).
# Results, config and run.log land in the output directory; the SuperLink this script starts is
# stopped when it exits, and the run is checked (`flwr run --stream` exits 0 even on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv ""

# A repo-local Flower home and our own ports: never reuse or disturb another managed SuperLink.
export FLWR_HOME=$PWD/.flwr
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # offline: deps are in .venv already
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39191}
export FLWR_LOCAL_CONTROL_API_PORT=${FLWR_LOCAL_CONTROL_API_PORT:-39193}
# Absolute: the run executes an installed copy of the app, not in this directory.
output_dir=${GAISNET_OUTPUT_DIR:-$PWD/outputs/$(date +%Y%m%d-%H%M%S)}

# flwr_local.py stops the SuperLink itself; this covers the script being interrupted around it.
trap '"$VENV_BIN/python" scripts/flwr_local.py stop || true' EXIT
"$VENV_BIN/python" scripts/flwr_local.py run \
    --output-dir "$output_dir" \
    --num-supernodes "${GAISNET_CLUSTERS:-4}" \
    --client-cpus "${GAISNET_CLIENT_CPUS:-1}" \
    --client-gpus "${GAISNET_CLIENT_GPUS:-0}" \
    -- "$@"
