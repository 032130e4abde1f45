"""Start and stop a real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, each a child process with its own data dir and logs.

    python -m loraserve.local.cluster --dir .local-cluster      # runs until Ctrl-C; prints KUBECONFIG

The binaries come from hack/build-cluster-bins.sh (built from their Go modules, cached by version).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the kubernetes Service: the first address of SERVICE_CIDR
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_bin_dir() -> Path:
    """LORASERVE_BIN_DIR, else build (or find cached) with the project's script."""
    env = os.environ.get("LORASERVE_BIN_DIR")
    if env:
        return Path(env)
    script = REPO_ROOT / "hack" / "build-cluster-bins.sh"
    out = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class LocalCluster:
    workdir: Path
    bin_dir: Path = field(default_factory=find_bin_dir)
    api_port: int = field(default_factory=free_port)
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    def env(self) -> dict[str, str]:
        """Environment for a child that should talk to this cluster (kubectl, helm, the operator)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}

    # -- start/stop -----------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        for name in BINARIES:
            if not (self.bin_dir / name).is_file():
                raise FileNotFoundError(f"{self.bin_dir / name} missing: run hack/build-cluster-bins.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._write_credentials()
        try:
            self._spawn("etcd", self._etcd_args())
            self._spawn("kube-apiserver", self._apiserver_args())
            self._wait_healthy("/readyz", timeout)
            self._spawn("kube-controller-manager", self._controller_manager_args())
            self._spawn("kube-scheduler", self._scheduler_args())
            self._wait_default_service_account(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            proc = self.processes.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- pieces ---------------------------------------------------------------------------------------
    def _write_credentials(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        sa_key = pki / "sa.key"
        if not sa_key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
            subprocess.run(
                ["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(pki / "sa.pub")],
                check=True,
                capture_output=True,
            )
        self._write_serving_certificate(pki)
        tokens = pki / "tokens.csv"
        tokens.write_text(f"{self.token},admin,admin,system:masters\n")
        tokens.chmod(0o600)
        ca = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
            "current-context": "local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def _write_serving_certificate(self, pki: Path) -> None:
        """A CA of this cluster's own and the API server's certificate from it: clients verify the server (the
        kubeconfig carries the CA), as on any real cluster. Kept across restarts of the same work dir."""
        if (pki / "ca.crt").exists() and (pki / "apiserver.crt").exists():
            return
        names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
        alt = ",".join(["IP:127.0.0.1", f"IP:{SERVICE_IP}", "DNS:localhost", *(f"DNS:{n}" for n in names)])
        (pki / "apiserver.ext").write_text(
            f"subjectAltName={alt}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        )
        steps = [
            "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=loraserve-local-ca",
            "req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver",
            "x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile apiserver.ext "
            "-out apiserver.crt",
        ]
        for step in steps:
            subprocess.run(["openssl", *step.split()], check=True, capture_output=True, cwd=pki)
        for key in ("ca.key", "apiserver.key"):
            (pki / key).chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.processes[name] = subprocess.Popen(
            [self.binary(name), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.workdir / "pki"
        return [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            # PodSecurity is on by default; namespaces opt in with pod-security.kubernetes.io/enforce labels.
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,PodSecurity",
            "--endpoint-reconciler-type=none",
            "--v=1",
        ]

    def _controller_manager_args(self) -> list[str]:
        pki = self.workdir / "pki"
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=false",
            # Fake nodes heartbeat every few seconds; do not evict their pods on a brief pause of the agent.
            "--node-monitor-grace-period=60s",
            # A cluster sized for a thousand Deployments created at once: at the default 20 calls a second the
            # controller-manager's ReplicaSets and pods are the queue, not the operator under test.
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--v=1",
        ]

    def _scheduler_args(self) -> list[str]:
        return [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0", "--v=1"]

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def request(self, path: str) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=str(self.workdir / "pki" / "ca.crt"))
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _wait_healthy(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                status, _ = self.request(path)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready at {self.server}{path} after {timeout}s")
            time.sleep(0.25)

    def _wait_default_service_account(self, timeout: float) -> None:
        # Pod admission waits for the `default` ServiceAccount that the controller-manager creates.
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            status, body = self.request("/api/v1/namespaces/default/serviceaccounts/default")
            if status == 200 and json.loads(body).get("metadata"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("controller-manager did not create the default ServiceAccount")
            time.sleep(0.25)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the cluster's kubectl; with check, a failure raises with kubectl's own error text."""
        result = subprocess.run(
            [self.binary("kubectl"), *args], env=self.env(), text=True, capture_output=True, input=input
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.local.cluster", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".local-cluster"), help="data dir (wiped first)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    cluster = LocalCluster(args.dir.resolve())
    started = time.monotonic()
    cluster.start()
    print(f"cluster ready in {time.monotonic() - started:.1f}s: export KUBECONFIG={cluster.kubeconfig}", flush=True)
    print(f"binaries: export PATH={cluster.bin_dir}:$PATH", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop:
            cluster._check_alive()
            time.sleep(1)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
