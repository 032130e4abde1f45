#!/usr/bin/env bash
# Installs what the tests and the local trial need, from nothing; every step is cached and quick to rerun:
# the project's virtualenv (.venv), the control plane built from Go modules, and vLLM for CPU.
# Prints `export` lines for LORASERVE_BIN_DIR and LORASERVE_VLLM_PYTHON on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --no-input -e '.[dev]' >&2
command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2; } >&2
# The two heavy builds are independent (Go compile vs. downloads): run them side by side on a cold machine.
vllm_out=$(mktemp)
bash hack/install-vllm.sh >"$vllm_out" &
vllm_pid=$!
trap 'kill "$vllm_pid" 2>/dev/null || true; rm -f "$vllm_out"' EXIT   # a failed Go build stops the other build too
bin_dir=$(bash hack/build-cluster-bins.sh)
wait "$vllm_pid"
echo "export LORASERVE_BIN_DIR=$bin_dir"
echo "export LORASERVE_VLLM_PYTHON=$(cat "$vllm_out")"
