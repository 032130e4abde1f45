#!/usr/bin/env bash
# The project's test command: installs what the tests need (cached outside the repo, keyed by version),
# runs the static checks, then pytest with any arguments given (default: every test, slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install --quiet --no-input -e '.[dev]'

LORASERVE_BIN_DIR="$(bash hack/build-cluster-bins.sh)"
LORASERVE_VLLM_PYTHON="$(bash hack/install-vllm.sh)"
export LORASERVE_BIN_DIR LORASERVE_VLLM_PYTHON

.venv/bin/ruff check operator tests hack
.venv/bin/ruff format --check operator tests hack
.venv/bin/lint-imports
.venv/bin/mypy
.venv/bin/python -m loraserve.crdgen --check

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
