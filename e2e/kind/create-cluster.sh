#!/usr/bin/env bash
# Creates (or reuses) a kind cluster for loraserve and makes its workers look like GPU nodes to the operator:
# the accelerator and region labels, and GPU capacity (faked in the node status, or real with --real-gpus).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SCRIPT_DIR="$REPO_ROOT/e2e/kind"

usage() {
  cat <<EOF
Usage: e2e/kind/create-cluster.sh [--real-gpus] [--gpus N] [--accelerator TYPE] [--region REGION] [--image IMAGE]

Creates the kind cluster "$KIND_CLUSTER_NAME" (one control plane, workers from e2e/kind/cluster.yaml), or reuses
it when it exists, writes its kubeconfig to $LORASERVE_KIND_KUBECONFIG, then on every worker:
  - labels $LORASERVE_ACCELERATOR_LABEL=TYPE and $LORASERVE_REGION_LABEL=REGION;
  - without --real-gpus: patches the node status so it advertises N GPUs (nvidia.com/gpu, or amd.com/gpu
    for AMD types). Pods asking for GPUs are scheduled, but no GPU is behind them: vLLM cannot serve there.
  - with --real-gpus: uses e2e/kind/cluster-gpu.yaml (one worker with all the host's NVIDIA GPUs; Docker's
    default runtime must be the NVIDIA one, see that file), installs the NVIDIA container toolkit in the
    worker, and installs the NVIDIA device plugin (Helm chart nvidia-device-plugin $NVIDIA_DEVICE_PLUGIN_VERSION).

Options:
  --real-gpus         the host's NVIDIA GPUs instead of fake capacity
  --gpus N            fake GPUs per worker (default: 8)
  --accelerator TYPE  NVIDIA_A100_80GB (default), NVIDIA_H100_80GB or AMD_MI300X_192GB
  --region REGION     default: us-east-1
  --image IMAGE       kind node image (default: the one of your kind version)
  -h, --help          this message

Environment: KIND_CLUSTER_NAME (default loraserve), LORASERVE_KIND_KUBECONFIG, NVIDIA_DEVICE_PLUGIN_VERSION.
Needs docker, kind, kubectl (1.24 or newer), and helm with --real-gpus.
EOF
}

NVIDIA_DEVICE_PLUGIN_VERSION="${NVIDIA_DEVICE_PLUGIN_VERSION:-0.17.1}"
real_gpus=false
gpus=8
accelerator=NVIDIA_A100_80GB
region=us-east-1
image=""
while [ $# -gt 0 ]; do
  case "$1" in
    --real-gpus) real_gpus=true ;;
    --gpus) gpus="${2:?--gpus needs a number}"; shift ;;
    --accelerator) accelerator="${2:?--accelerator needs a type}"; shift ;;
    --region) region="${2:?--region needs a value}"; shift ;;
    --image) image="${2:?--image needs an image}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
  shift
done

case "$accelerator" in
  NVIDIA_A100_80GB | NVIDIA_H100_80GB) resource=nvidia.com/gpu ;;
  AMD_MI300X_192GB) resource=amd.com/gpu ;;
  *) die "unknown accelerator type $accelerator" ;;
esac
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive number, not $gpus"

need docker kind kubectl
config="$SCRIPT_DIR/cluster.yaml"
if [ "$real_gpus" = true ]; then
  need helm
  [ "$resource" = nvidia.com/gpu ] || die "--real-gpus supports NVIDIA accelerator types only"
  [ "$(docker info --format '{{.DefaultRuntime}}')" = nvidia ] ||
    die "Docker's default runtime is not nvidia: see the setup steps at the top of e2e/kind/cluster-gpu.yaml"
  config="$SCRIPT_DIR/cluster-gpu.yaml"
fi

mkdir -p "$(dirname "$LORASERVE_KIND_KUBECONFIG")"
clusters="$(kind get clusters 2>/dev/null)"
if grep -qx "$KIND_CLUSTER_NAME" <<<"$clusters"; then
  log "cluster $KIND_CLUSTER_NAME exists: reusing it (kind delete cluster --name $KIND_CLUSTER_NAME to start over)"
  kind export kubeconfig --name "$KIND_CLUSTER_NAME" --kubeconfig "$LORASERVE_KIND_KUBECONFIG"
else
  log "creating cluster $KIND_CLUSTER_NAME from ${config#"$REPO_ROOT"/}"
  create=(kind create cluster --name "$KIND_CLUSTER_NAME" --config "$config"
    --kubeconfig "$LORASERVE_KIND_KUBECONFIG" --wait 5m)
  if [ -n "$image" ]; then create+=(--image "$image"); fi
  "${create[@]}"
fi
export KUBECONFIG="$LORASERVE_KIND_KUBECONFIG"
kubectl wait --for=condition=Ready node --all --timeout=300s >/dev/null

read -r -a workers <<<"$(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
  -o jsonpath='{.items[*].metadata.name}')"
[ "${#workers[@]}" -gt 0 ] || die "the cluster has no worker nodes"

for node in "${workers[@]}"; do
  log "$node: $LORASERVE_ACCELERATOR_LABEL=$accelerator $LORASERVE_REGION_LABEL=$region"
  kubectl label node "$node" --overwrite \
    "$LORASERVE_ACCELERATOR_LABEL=$accelerator" "$LORASERVE_REGION_LABEL=$region" >/dev/null
done

if [ "$real_gpus" = false ]; then
  # Extended resources advertised by hand (what a device plugin would report); the kubelet keeps them and
  # derives allocatable from capacity. Patching both makes them visible to the scheduler at once.
  patch="{\"status\":{\"capacity\":{\"$resource\":\"$gpus\"},\"allocatable\":{\"$resource\":\"$gpus\"}}}"
  for node in "${workers[@]}"; do
    log "$node: $gpus fake $resource"
    kubectl patch node "$node" --subresource=status --type=merge -p "$patch" >/dev/null
  done
else
  for node in "${workers[@]}"; do
    log "$node: installing the NVIDIA container toolkit and making it containerd's default runtime"
    docker exec "$node" bash -euc '
      apt-get update -qq
      apt-get install -y -qq curl gpg >/dev/null
      curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey |
        gpg --dearmor --yes -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
      curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list |
        sed "s#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g" \
          >/etc/apt/sources.list.d/nvidia-container-toolkit.list
      apt-get update -qq
      apt-get install -y -qq nvidia-container-toolkit >/dev/null
      nvidia-ctk runtime configure --runtime=containerd --config-source=command --set-as-default
      systemctl restart containerd'
    # The device plugin chart schedules only on nodes that say they have NVIDIA GPUs.
    kubectl label node "$node" --overwrite nvidia.com/gpu.present=true >/dev/null
  done
  kubectl wait --for=condition=Ready node --all --timeout=300s >/dev/null
  log "installing the NVIDIA device plugin $NVIDIA_DEVICE_PLUGIN_VERSION"
  helm upgrade --install nvidia-device-plugin nvidia-device-plugin \
    --repo https://nvidia.github.io/k8s-device-plugin --version "$NVIDIA_DEVICE_PLUGIN_VERSION" \
    --namespace nvidia-device-plugin --create-namespace --wait --timeout 5m
  for node in "${workers[@]}"; do
    count=""
    for _ in $(seq 60); do
      count="$(kubectl get node "$node" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')"
      if [ -n "$count" ] && [ "$count" != 0 ]; then break; fi
      sleep 5
    done
    { [ -n "$count" ] && [ "$count" != 0 ]; } || die "$node advertises no nvidia.com/gpu after 5 minutes"
    log "$node: $count nvidia.com/gpu"
  done
fi

log "ready; KUBECONFIG=$LORASERVE_KIND_KUBECONFIG"
log "next: e2e/kind/build-images.sh && e2e/kind/install.sh && e2e/kind/run-e2e.sh"
