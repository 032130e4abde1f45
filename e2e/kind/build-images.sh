#!/usr/bin/env bash
# Builds loraserve's three images from images/ and loads them into the kind cluster's nodes.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<EOF
Usage: e2e/kind/build-images.sh [--no-model-server] [--no-load]

Builds, from the repository root, with the tags the chart uses by default (its appVersion, $APP_VERSION):
  loraserve/operator:$APP_VERSION       images/operator/Dockerfile
  loraserve/router:$APP_VERSION         images/router/Dockerfile
  loraserve/model-server:$APP_VERSION   images/vllm/Dockerfile, vLLM $VLLM_VERSION (hack/versions.env)
then loads them into the nodes of the kind cluster "$KIND_CLUSTER_NAME" (kind load docker-image).

Options:
  --no-model-server  skip the model server (GPU vLLM: a large image, slow to build and to load)
  --no-load          build only
  -h, --help         this message

Environment: KIND_CLUSTER_NAME (default loraserve), VLLM_VERSION (default from hack/versions.env).
Needs docker, and kind unless --no-load.
EOF
}

model_server=true
load=true
while [ $# -gt 0 ]; do
  case "$1" in
    --no-model-server) model_server=false ;;
    --no-load) load=false ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done

[ -n "$APP_VERSION" ] || die "no appVersion in charts/loraserve/Chart.yaml"
[ -n "$VLLM_VERSION" ] || die "no VLLM_VERSION in hack/versions.env"
need docker
if [ "$load" = true ]; then need kind; fi

images=()
build() { # build IMAGE DOCKERFILE [docker build args...]
  local image="$1" dockerfile="$2"
  shift 2
  log "building $image"
  docker build -f "$REPO_ROOT/$dockerfile" -t "$image" "$@" "$REPO_ROOT"
  images+=("$image")
}
build "loraserve/operator:$APP_VERSION" images/operator/Dockerfile
build "loraserve/router:$APP_VERSION" images/router/Dockerfile
if [ "$model_server" = true ]; then
  build "loraserve/model-server:$APP_VERSION" images/vllm/Dockerfile --build-arg "VLLM_VERSION=$VLLM_VERSION"
fi

if [ "$load" = true ]; then
  log "loading ${images[*]} into kind cluster $KIND_CLUSTER_NAME"
  kind load docker-image --name "$KIND_CLUSTER_NAME" "${images[@]}"
fi
