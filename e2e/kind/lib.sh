# shellcheck shell=bash source-path=SCRIPTDIR
# Sourced by the e2e/kind scripts (not run by itself): names, paths and versions they share. Each can be
# overridden from the environment.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIND_CLUSTER_NAME="${KIND_CLUSTER_NAME:-loraserve}"
# Written by create-cluster.sh, read by the others; the user's own ~/.kube/config is left alone.
LORASERVE_KIND_KUBECONFIG="${LORASERVE_KIND_KUBECONFIG:-${XDG_CACHE_HOME:-$HOME/.cache}/loraserve/kind-$KIND_CLUSTER_NAME.kubeconfig}"
LORASERVE_NAMESPACE="${LORASERVE_NAMESPACE:-loraserve-system}"
# The node labels the operator selects on (operator/loraserve/resources/settings.py; same variables).
LORASERVE_ACCELERATOR_LABEL="${LORASERVE_ACCELERATOR_LABEL:-serving.loraserve.dev/accelerator}"
LORASERVE_REGION_LABEL="${LORASERVE_REGION_LABEL:-topology.kubernetes.io/region}"

# The image tag: the chart's appVersion (the chart's default tag). The vLLM version: hack/versions.env.
APP_VERSION="${APP_VERSION:-$(sed -n 's/^appVersion: *"\{0,1\}\([^" ]*\)"\{0,1\} *$/\1/p' "$REPO_ROOT/charts/loraserve/Chart.yaml")}"
env_vllm="${VLLM_VERSION:-}"
# shellcheck source=../../hack/versions.env
. "$REPO_ROOT/hack/versions.env"
VLLM_VERSION="${env_vllm:-$VLLM_VERSION}"

log() { printf '[kind] %s\n' "$*" >&2; }
die() { printf '[kind] error: %s\n' "$*" >&2; exit 1; }
need() {
  local tool
  for tool in "$@"; do command -v "$tool" >/dev/null || die "$tool is not on PATH"; done
}
need_kubeconfig() {
  [ -f "$LORASERVE_KIND_KUBECONFIG" ] || die "no kubeconfig at $LORASERVE_KIND_KUBECONFIG: run e2e/kind/create-cluster.sh first"
  export KUBECONFIG="$LORASERVE_KIND_KUBECONFIG"
}
