#!/usr/bin/env bash
# The local trial: a real control plane, a GPU node whose pods really run (vLLM for CPU, a tiny generated
# model), the operator and the router; then a multi-LoRA Deployment, a ModelVersion and a LoraAddon, and
# requests through the router with the OpenAI client. Needs root (pods get their own network namespaces).
#   hack/local-trial.sh            # runs until Ctrl-C
#   hack/local-trial.sh --once     # stops after the requests
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash hack/setup.sh)"
exec .venv/bin/python hack/local_trial.py "$@"
