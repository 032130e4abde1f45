"""The product installed the way a user installs it, on the local runtime.

`helm install` of charts/loraserve into a real control plane (CRDs from the chart), then the operator and the
router run as local processes (the local runtime runs only model-server pods), each:

- authenticated as the ServiceAccount the chart created, with a token from the TokenRequest API written
  into its own kubeconfig (not admin, not impersonation);
- started with the container args and env of the Deployment the chart rendered (`helm get manifest`), as many
  processes as the chart's replicas; the only substitutions are what a pod would get from the kubelet: the
  Secret volumes it mounts (written to files, paths rewritten), in-cluster credentials (the ServiceAccount
  kubeconfig), its ports (free local ports), and the router's metrics address (the router is a process here,
  not a pod the operator could list).

So an RBAC rule, a flag or a value the chart lacks fails the suite the way it would fail a user.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tests.fixtures.wait import wait_for

from loraserve.local.cluster import LocalCluster, free_port
from loraserve.peering import PAUSED, RESUMED, STANDING_BY

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "loraserve"
RELEASE = "loraserve"
SYSTEM_NS = "loraserve-system"
RUN_REGION = "local"
RUN_TOLERATION = {
    "key": "serving.loraserve.dev/local-pool",
    "operator": "Equal",
    "value": "run",
    "effect": "NoSchedule",
}
# Where a test's Deployment really runs (vLLM CPU on the run-pool node), sized for the tiny test model.
RUN_POOL_PLACEMENT: dict[str, Any] = {
    "region": RUN_REGION,
    "tolerations": [RUN_TOLERATION],
    "extraArgs": ["--max-model-len=256", "--dtype=float32"],
}


def run_helm(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([cluster.binary("helm"), *args], env=cluster.env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def service_account_kubeconfig(cluster: LocalCluster, account: str, out: Path, namespace: str = SYSTEM_NS) -> Path:
    """A kubeconfig that authenticates as system:serviceaccount:<namespace>:<account> (TokenRequest API)."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=6h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "local", "user": account}}],
        "current-context": account,
    }
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


def rendered_container(manifests: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the first container, the pod spec) of the chart-rendered apps/v1 Deployment `name`, plus its replicas
    in pod_spec["_replicas"]."""
    for doc in manifests:
        if doc.get("kind") == "Deployment" and doc["metadata"]["name"] == name:
            pod = dict(doc["spec"]["template"]["spec"])
            pod["_replicas"] = doc["spec"].get("replicas", 1)
            return pod["containers"][0], pod
    raise AssertionError(f"the chart rendered no Deployment {name}")


def operator_acting(log: str) -> bool:
    """Whether the operator writing this log (appended to across restarts) acts now: its last start stood
    by (Kopf peering), then it resumed and has not paused since."""
    tail = log[max(log.rfind(STANDING_BY), 0) :]
    return tail.rfind(RESUMED) > tail.rfind(PAUSED)


@dataclass
class ChartProcess:
    """One replica of a chart-rendered container, run as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ports: dict[int, int]  # container port -> local port
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _localize(value: str, ports: dict[int, int], mounts: dict[str, Path]) -> str:
    for container_path, host in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        value = value.replace(container_path, str(host))
    for port, local in ports.items():
        value = re.sub(rf"(?<=[:=]){port}\b", str(local), value)
    return value


@dataclass
class Product:
    """The installed product: the chart's release, its operator and router processes, the run pool."""

    cluster: LocalCluster
    workdir: Path
    vllm_python: str
    set_values: list[str] = field(default_factory=list)
    operators: list[ChartProcess] = field(default_factory=list)
    router: ChartProcess | None = None
    agent: subprocess.Popen[bytes] | None = None
    manifests: list[dict[str, Any]] = field(default_factory=list)
    _api_key: str | None = None

    # -- install ----------------------------------------------------------------------------------------
    def install(self) -> None:
        self.agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loraserve.local.nodeagent",
                "--kubeconfig",
                str(self.cluster.kubeconfig),
                "--pool",
                "run",
                "--run-dir",
                str(self.workdir / "pods"),
                "--vllm-python",
                self.vllm_python,
                "--cidr-base",
                "150",
                "--node",
                f"e2e-run-0=NVIDIA_A100_80GB:8:{RUN_REGION}",
            ],
            stdout=open(self.workdir / "nodeagent.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        args = ["install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace", "--wait=false"]
        for value in self.set_values:
            args += ["--set-json", value]
        run_helm(self.cluster, *args)
        self.manifests = [
            d
            for d in yaml.safe_load_all(run_helm(self.cluster, "get", "manifest", RELEASE, "-n", SYSTEM_NS).stdout)
            if d
        ]
        self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        self.start_router()
        for i in range(self._pod(f"{RELEASE}-operator")[1]["_replicas"]):
            self.operators.append(self._operator_process(i))
            self.operators[-1].start()

    def _pod(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        return rendered_container(self.manifests, name)

    def _mount_secrets(self, pod: dict[str, Any], container: dict[str, Any], into: Path) -> dict[str, Path]:
        """What the kubelet does for Secret volumes: their keys as files, at a path we map the mount to."""
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            if "secret" not in volume:
                continue
            secret = json.loads(
                self.cluster.kubectl(
                    "get", "secret", volume["secret"]["secretName"], "-n", SYSTEM_NS, "-o", "json"
                ).stdout
            )
            folder = into / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            data = secret.get("data") or {}
            # `items` projects only the listed keys (the router gets the API keys' digests, never a key).
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (folder / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
                (folder / item["path"]).chmod(0o600)
            mounts[mount["mountPath"]] = folder
        return mounts

    def _env(self, container: dict[str, Any], ports: dict[int, int], mounts: dict[str, Path]) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(self.workdir), "PYTHONUNBUFFERED": "1"}
        for var in container.get("env") or []:
            assert "value" in var, f"the e2e harness does not map env {var['name']} (valueFrom)"
            env[var["name"]] = _localize(str(var["value"]), ports, mounts)
        return env

    def start_router(self) -> None:
        container, pod = self._pod(f"{RELEASE}-router")
        folder = self.workdir / "router"
        folder.mkdir(exist_ok=True)
        mounts = self._mount_secrets(pod, container, folder)
        ports = {p["containerPort"]: free_port() for p in container.get("ports") or []}
        kubeconfig = service_account_kubeconfig(self.cluster, pod["serviceAccountName"], folder / "kubeconfig")
        args = []
        for arg in container.get("args") or []:
            if arg == "--in-cluster":  # the pod's in-cluster credentials = the ServiceAccount's token
                args.append(f"--kubeconfig={kubeconfig}")
            else:
                args.append(_localize(arg, ports, mounts))
        self.router = ChartProcess(
            "router",
            [sys.executable, "-m", "loraserve.router", "--host=127.0.0.1", *args],
            self._env(container, ports, mounts),
            self.workdir / "router.log",
            ports,
        )
        self.router.start()
        wait_for(self._router_healthy, timeout=60, message="router /health")

    def _router_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.router_url + "/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    @property
    def router_url(self) -> str:
        assert self.router is not None
        return f"http://127.0.0.1:{next(iter(self.router.ports.values()))}"

    def _operator_process(self, index: int) -> ChartProcess:
        container, pod = self._pod(f"{RELEASE}-operator")
        folder = self.workdir / f"operator-{index}"
        folder.mkdir(exist_ok=True)
        mounts = self._mount_secrets(pod, container, folder)
        ports = {p["containerPort"]: free_port() for p in container.get("ports") or []}
        kubeconfig = service_account_kubeconfig(self.cluster, pod["serviceAccountName"], folder / "kubeconfig")
        env = self._env(container, ports, mounts)
        env["KUBECONFIG"] = str(kubeconfig)
        # The router is a process here, not a pod behind the Service the chart names: point at it directly.
        env["LORASERVE_ROUTER_LOAD_URLS"] = self.router_url + "/load"
        args = [_localize(a, ports, mounts) for a in container.get("args") or []]
        return ChartProcess(
            f"operator-{index}",
            [sys.executable, "-m", "loraserve.cli.main", *args],
            env,
            self.workdir / f"operator-{index}.log",
            ports,
        )

    def operator_metrics_url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.operators[index].ports[9090]}/metrics"

    def model_server_key(self) -> bytes:
        secret = json.loads(
            self.cluster.kubectl("get", "secret", f"{RELEASE}-model-server-key", "-n", SYSTEM_NS, "-o", "json").stdout
        )
        return base64.b64decode(secret["data"]["key"])

    def api_key(self) -> str:
        """The router's API key the chart generated (auth is on by default), as a user reads it (NOTES.txt)."""
        if self._api_key is not None:
            return self._api_key
        secret = json.loads(
            self.cluster.kubectl("get", "secret", f"{RELEASE}-router-api-key", "-n", SYSTEM_NS, "-o", "json").stdout
        )
        self._api_key = base64.b64decode(secret["data"]["key"]).decode()
        return self._api_key

    # -- teardown ---------------------------------------------------------------------------------------
    def stop_processes(self) -> None:
        for proc in [*self.operators, *([self.router] if self.router else [])]:
            proc.stop()
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(90)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
