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
echo "export LORASERVE_BIN_DIR=$(bash hack/build-cluster-bins.sh)"
echo "export LORASERVE_VLLM_PYTHON=$(bash hack/install-vllm.sh)"
