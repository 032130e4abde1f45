#!/usr/bin/env bash
# Runs the e2e suite (python -m pytest e2e) against the kind cluster.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF_USAGE
Usage: e2e/kind/run-e2e.sh [PYTEST_ARGS...]

Runs python -m pytest e2e from the repository root with LORASERVE_E2E_KUBECONFIG=$LORASERVE_KIND_KUBECONFIG
and E2E_TARGET=kind: the suite drives the loraserve installed by e2e/kind/install.sh. PYTEST_ARGS go to
pytest, e.g. -k addon -x.

Options:
  -h, --help  this message (as the first argument; pytest's own help: python -m pytest --help)

Environment: KIND_CLUSTER_NAME (default loraserve), LORASERVE_KIND_KUBECONFIG, PYTHON (default: the
project's .venv, from hack/setup.sh, else python3).
EOF_USAGE
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  *) ;;
esac

[ -f "$LORASERVE_KIND_KUBECONFIG" ] ||
  die "no kubeconfig at $LORASERVE_KIND_KUBECONFIG: run e2e/kind/create-cluster.sh and e2e/kind/install.sh first"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then python="$REPO_ROOT/.venv/bin/python"; else python=python3; fi
fi
cd "$REPO_ROOT"
export LORASERVE_E2E_KUBECONFIG="$LORASERVE_KIND_KUBECONFIG" E2E_TARGET=kind
exec "$python" -m pytest e2e "$@"
