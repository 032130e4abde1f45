"""The local trial (run by hack/local-trial.sh)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.models import adapter_dirs, tiny_model_dir  # noqa: E402

from loraserve.api.naming import base_model_name  # noqa: E402
from loraserve.digest import directory_digest  # noqa: E402
from loraserve.local.cluster import LocalCluster  # noqa: E402

API = "serving.loraserve.dev/v1alpha1"
# The trial's node really runs its pods; it is tainted so only Deployments that ask land there.
RUN_POOL = {"key": "serving.loraserve.dev/local-pool", "operator": "Equal", "value": "run", "effect": "NoSchedule"}


def wait(what: str, check: object, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=ROOT / ".local-cluster")
    parser.add_argument("--router-port", type=int, default=8080)
    parser.add_argument("--once", action="store_true", help="stop after the trial requests")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    cluster = LocalCluster(args.dir)
    cluster.start()
    logs = args.dir / "logs"
    children: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *argv: str, env: dict[str, str] | None = None) -> None:
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115
        children.append(subprocess.Popen([sys.executable, *argv], env=env or cluster.env(), stdout=out, stderr=out))

    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "-f", str(ROOT / "crds"))
        spawn(
            "nodeagent",
            "-m",
            "loraserve.local.nodeagent",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--pool",
            "run",
            "--run-dir",
            str(args.dir / "pods"),
            "--vllm-python",
            os.environ["LORASERVE_VLLM_PYTHON"],
            "--node",
            "gpu-0=NVIDIA_A100_80GB:8:local",
        )
        router = f"http://127.0.0.1:{args.router_port}"
        spawn(
            "operator",
            "-m",
            "loraserve.cli.main",
            "operator",
            "--standalone",
            env={**cluster.env(), "LORASERVE_ROUTER_METRICS_URLS": f"{router}/metrics"},
        )
        spawn(
            "router",
            "-m",
            "loraserve.router",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.router_port),
            "--kubeconfig",
            str(cluster.kubeconfig),
        )
        base = f"file://{tiny_model_dir()}"
        adapter = adapter_dirs()["alpha"]
        docs = [
            {
                "apiVersion": API,
                "kind": "Deployment",
                "metadata": {"name": "trial"},
                "spec": {
                    "baseModel": base,
                    "enableAddons": True,
                    "region": "local",
                    "tolerations": [RUN_POOL],
                    "maxReplicas": 1,
                    "extraArgs": ["--max-model-len=256", "--dtype=float32"],
                },
            },
            {
                "apiVersion": API,
                "kind": "ModelVersion",
                "metadata": {"name": "poet-v1"},
                "spec": {
                    "version": "v1",
                    "baseModel": {"name": base, "revision": "local"},
                    "adapter": {"uri": f"file://{adapter}", "digest": directory_digest(adapter), "rank": 8},
                },
            },
            {
                "apiVersion": API,
                "kind": "LoraAddon",
                "metadata": {"name": "poet"},
                "spec": {"deployment": "trial", "targets": [{"modelVersion": "poet-v1", "weight": 100}]},
            },
        ]
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        wait("the router", lambda: _ok(f"{router}/health"), 60)
        print(f"cluster ready: export KUBECONFIG={cluster.kubeconfig}; router at {router}/v1", flush=True)
        client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", timeout=900, max_retries=0)
        started = time.monotonic()
        for model in (f"{base_model_name(base)}#trial", "poet#trial"):
            out = client.completions.create(model=model, prompt="the river and the", max_tokens=12, temperature=0)
            print(f"{model:>12}: {out.choices[0].text!r}  ({time.monotonic() - started:.0f}s)", flush=True)
        print(cluster.kubectl("get", "loraserve").stdout, flush=True)
        if not args.once:
            print("running; Ctrl-C stops everything", flush=True)
            while all(c.poll() is None for c in children):
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for child in reversed(children):
            child.terminate()
            child.wait(60)
        cluster.stop()
    return 0


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
