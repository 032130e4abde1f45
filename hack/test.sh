#!/usr/bin/env bash
# The project's test command: installs what the tests need (cached outside the repo, keyed by version),
# runs the static checks, then pytest with any arguments given (default: every test, slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash hack/setup.sh)"

.venv/bin/ruff check operator tests hack e2e conftest.py
.venv/bin/ruff format --check operator tests hack e2e conftest.py
.venv/bin/lint-imports
.venv/bin/mypy
.venv/bin/python -m loraserve.crdgen --check

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
