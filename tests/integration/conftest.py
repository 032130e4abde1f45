"""Fixtures on real parts: the local control plane (etcd, kube-apiserver, controller-manager, scheduler)
with fake GPU nodes, started once per test session."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.harness import RUN_REGION, RUN_TOLERATION

from loraserve.local.cluster import LocalCluster, free_port
from loraserve.router.metrics import RouterMetrics
from tests.fixtures.wait import wait_for

__all__ = ["RUN_REGION", "RUN_TOLERATION", "apply", "get", "status", "wait_for"]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    local.start()
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraserve.local.nodeagent",
            "--kubeconfig",
            str(local.kubeconfig),
            "--node",
            "gpu-a100-0=NVIDIA_A100_80GB:8:us-east-1",
            "--node",
            "gpu-h100-0=NVIDIA_H100_80GB:8:us-east-1",
        ],
        stdout=open(local.workdir / "logs" / "nodeagent.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        local.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        local.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
        yield local
    finally:
        agent.terminate()
        agent.wait(10)
        local.stop()


class Operator:
    """The real operator (`loraserve operator`) as a child process, killable and restartable."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cluster.workdir / "logs" / "operator.log"

    def start(self) -> None:
        env = {
            **self.cluster.env(),
            # The autoscaler reads the session's router (see the `router` fixture) every second.
            "LORASERVE_ROUTER_LOAD_URLS": f"http://127.0.0.1:{ROUTER_PORT}/load,http://127.0.0.1:{LOAD_PORT}/load",
            "LORASERVE_AUTOSCALE_TICK": "1",
            # Serverless pools run on the run pool's node (when a test starts it) as small CPU vLLM servers,
            # and an unused pool goes after 20 s instead of 10 min.
            "LORASERVE_SERVERLESS_POOL_SPEC": json.dumps(
                {
                    "region": RUN_REGION,
                    "tolerations": [RUN_TOLERATION],
                    "maxLoras": 4,
                    "maxLoraRank": 16,
                    "extraArgs": ["--max-model-len=256", "--dtype=float32"],
                }
            ),
            "LORASERVE_SERVERLESS_POOL_GC_AFTER": "20s",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraserve.cli.main", "operator", "--standalone", "--verbose"],
            env=env,
            stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def suite_operator(cluster: LocalCluster) -> Iterator[Operator]:
    op = Operator(cluster)
    yield op
    op.kill()


@pytest.fixture
def operator(suite_operator: Operator) -> Operator:
    """The suite's cluster-wide operator, running (started again if a test before stopped it)."""
    if suite_operator.proc is None:
        suite_operator.start()
    return suite_operator


@pytest.fixture
def sole_operator(cluster: LocalCluster, suite_operator: Operator) -> Iterator[Operator]:
    """An operator of the test's own, killable at will, and the only one acting: the suite's operator (standalone,
    so it ignores peering) is stopped for the test; otherwise two would load the same adapters at once."""
    suite_operator.kill()
    op = Operator(cluster)
    try:
        yield op
    finally:
        op.kill()


# Deployments that should really run ask for the run pool's node: its region and a toleration of its taint
# (the same node shape as the e2e suite's).
ROUTER_PORT = free_port()
LOAD_PORT = free_port()


class LoadSource:
    """A stand-in for a router replica's GET /load: the in-flight load a test sets, per deployment (written by
    the router's own metrics)."""

    def __init__(self) -> None:
        self.in_flight: dict[tuple[str, str], float] = {}
        self.last_request: dict[tuple[str, str], float] = {}
        handler = self._handler()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", LOAD_PORT), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def body(self) -> bytes:
        metrics = RouterMetrics()
        for (ns, name), value in self.in_flight.items():
            metrics.series(ns, name, None).in_flight = int(value)
        for (ns, name), value in self.last_request.items():
            metrics.series(ns, name, None).last_request = value
        return metrics.load()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = source.body()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture(scope="session")
def load_source() -> Iterator[LoadSource]:
    source = LoadSource()
    yield source
    source.server.shutdown()


@pytest.fixture(scope="session")
def router(cluster: LocalCluster) -> Iterator[str]:
    """The router (`python -m loraserve.router`) watching the local cluster; yields its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraserve.router",
            "--host",
            "127.0.0.1",
            "--port",
            str(ROUTER_PORT),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--adapter-poll-interval",
            "1",
        ],
        stdout=open(cluster.workdir / "logs" / "router.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{ROUTER_PORT}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=60, message="router /health")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def run_pool(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node whose pods really run (vLLM CPU + fetcher, in network namespaces). Deployments reach it with
    `region: local`. Yields the region."""
    from tests.fixtures.vllm_server import vllm_python

    run_dir = tmp_path_factory.mktemp("pods")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraserve.local.nodeagent",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--pool",
            "run",
            "--run-dir",
            str(run_dir),
            "--vllm-python",
            str(vllm_python()),
            "--cidr-base",
            "100",
            "--node",
            f"cpu-run-0=NVIDIA_A100_80GB:8:{RUN_REGION}",
        ],
        stdout=open(cluster.workdir / "logs" / "nodeagent-run.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        yield RUN_REGION
    finally:
        agent.terminate()
        agent.wait(60)


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# kubectl, as a user types it: the small helpers the cluster tests share
def apply(cluster: LocalCluster, ns: str, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))


def get(cluster: LocalCluster, ns: str, *what: str) -> Any:
    result = cluster.kubectl("get", *what, "-n", ns, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def status(cluster: LocalCluster, ns: str, kind: str, name: str) -> dict[str, Any]:
    return (get(cluster, ns, kind, name) or {}).get("status") or {}
