#!/usr/bin/env bash
# Builds the local control plane from Go modules, once per version, into a cache outside the repo:
# kube-apiserver, kube-controller-manager, kube-scheduler and kubectl (k8s.io/kubernetes), etcd
# (go.etcd.io/etcd/server/v3) and helm (helm.sh/helm/v3). A second run finds them and returns at once.
# Prints the directory holding the binaries (one line) on stdout.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.21.4}"
CACHE="${LORASERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loraserve}"
BIN="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
WORK="$CACHE/build"
mkdir -p "$BIN" "$WORK"
export GOFLAGS="-mod=mod -buildvcs=false"
log() { printf '[build-cluster-bins] %s\n' "$*" >&2; }

build_kubernetes() {
  local mod="$WORK/kubernetes-$K8S_VERSION"
  mkdir -p "$mod"
  (
    cd "$mod"
    # k8s.io/kubernetes requires its staging modules at v0.0.0 and maps them with local replaces, which
    # `go install pkg@version` refuses; pin each to the published v0.X.Y that matches v1.X.Y instead.
    local gomod staging="v0${K8S_VERSION#v1}"
    rm -f go.mod go.sum
    go mod init loraserve.dev/build/kubernetes >/dev/null 2>&1
    gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    {
      echo "require k8s.io/kubernetes $K8S_VERSION"
      grep -E '^\s*k8s\.io/[A-Za-z0-9._-]+ v0\.0\.0$' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
    } >>go.mod
    local ver="${K8S_VERSION#v}" ldflags
    ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
      -X k8s.io/component-base/version.gitMajor=${ver%%.*} -X k8s.io/component-base/version.gitMinor=$(echo "$ver" | cut -d. -f2) \
      -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    log "building kubernetes $K8S_VERSION (many minutes when cold)"
    go build -ldflags "$ldflags" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
  )
}

build_etcd() {
  local mod="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$mod"
  (
    cd "$mod"
    rm -f go.mod go.sum
    go mod init loraserve.dev/build/etcd >/dev/null 2>&1
    # the server module's own replaces point at sibling folders; from outside, its requires pin them.
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
    log "building etcd $ETCD_VERSION"
    go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  )
}

build_helm() {
  log "building helm $HELM_VERSION"
  GOBIN="$BIN" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [ -x "$BIN/$b" ] || { build_kubernetes; break; }
done
[ -x "$BIN/etcd" ] || build_etcd
[ -x "$BIN/helm" ] || build_helm
echo "$BIN"
