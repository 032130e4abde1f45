#!/usr/bin/env bash
# Installs (or upgrades) the loraserve Helm chart into the kind cluster, as a user installs it.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: e2e/kind/install.sh [HELM_ARGS...]

Runs helm upgrade --install loraserve charts/loraserve in the namespace $LORASERVE_NAMESPACE of the kind
cluster (kubeconfig $LORASERVE_KIND_KUBECONFIG) and waits until the operator and the router are ready.
The images must be in the cluster first (e2e/kind/build-images.sh). HELM_ARGS go to helm, e.g.
--set router.apiKeysSecret=my-keys.

Options:
  -h, --help  this message

Environment: KIND_CLUSTER_NAME (default loraserve), LORASERVE_KIND_KUBECONFIG, LORASERVE_NAMESPACE.
Needs helm and kubectl.
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  *) ;;
esac

need helm kubectl
need_kubeconfig
log "installing charts/loraserve into $LORASERVE_NAMESPACE"
helm upgrade --install loraserve "$REPO_ROOT/charts/loraserve" \
  --namespace "$LORASERVE_NAMESPACE" --create-namespace --wait --timeout 10m "$@"
kubectl get crd -l app.kubernetes.io/part-of=loraserve
kubectl -n "$LORASERVE_NAMESPACE" get deployments.apps,services
log "installed; try: KUBECONFIG=$LORASERVE_KIND_KUBECONFIG kubectl apply -f examples/ && kubectl get loraserve"
