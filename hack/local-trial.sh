#!/usr/bin/env bash
# The local trial: installs what it needs (cached; see hack/setup.sh), then `loraserve local up "$@"`:
# a real control plane, a GPU node whose pods run vLLM for CPU, the operator and the router, then the README's
# quick-start commands. Needs root (pods get their own network namespaces).
#   hack/local-trial.sh [--model DIR --adapter DIR]    # starts it in the background and runs the quick start
#   hack/local-trial.sh down                          # stops it; nothing is left running
#   hack/local-trial.sh status
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash hack/setup.sh)"
case "${1:-}" in
  up | down | status) exec .venv/bin/loraserve local "$@" ;;
  *) exec .venv/bin/loraserve local up "$@" ;;
esac
