"""With `operator.watchNamespaces`, Kopf looks for a namespaced KopfPeering in each watched namespace. The
chart creates them, so of two operator replicas (the chart's default) exactly one acts; killed, the other
takes over. Run as the chart's ServiceAccount, with the chart's rendered args."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e.harness import operator_acting, rendered_container, service_account_kubeconfig

from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
CHART = Path(__file__).resolve().parents[2] / "charts" / "loraserve"


def paused(log: Path) -> bool:
    return not operator_acting(log.read_text(errors="replace") if log.exists() else "")


def test_two_namespaced_operators_one_acts(cluster: LocalCluster, namespace: str, tmp_path: Path) -> None:
    system = f"{namespace}-sys"
    helm = cluster.binary("helm")
    install = [helm, "install", "peer", str(CHART), "-n", system, "--create-namespace"]
    install += ["--set", f"operator.watchNamespaces={{{namespace}}}", "--wait=false"]
    subprocess.run(install, env=cluster.env(), check=True, capture_output=True)
    try:
        manifest = subprocess.run(
            [helm, "get", "manifest", "peer", "-n", system], env=cluster.env(), check=True, capture_output=True
        ).stdout
        container, pod = rendered_container([d for d in yaml.safe_load_all(manifest) if d], "peer-operator")
        assert pod["_replicas"] == 2
        args = [a for a in container["args"] if not a.startswith(("--liveness", "--metrics-port"))]
        assert f"--namespace={namespace}" in args
        kubeconfig = service_account_kubeconfig(cluster, "peer-operator", tmp_path / "kubeconfig", system)
        env = {**cluster.env(), "KUBECONFIG": str(kubeconfig)}
        logs = [tmp_path / f"operator-{i}.log" for i in range(2)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "loraserve.cli.main", *args],
                env=env,
                stdout=open(log, "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            for log in logs
        ]
        try:
            wait_for(lambda: sum(paused(log) for log in logs) == 1, timeout=60, message="one operator paused")
            text = "".join(log.read_text() for log in logs)
            assert "peering object is not found" not in text.lower()
            acting = next(i for i, log in enumerate(logs) if not paused(log))
            procs[acting].kill()
            procs[acting].wait()
            standby = 1 - acting
            # a killed peer stops counting once its keep-alive is older than the peering lifetime (10 s)
            wait_for(lambda: not paused(logs[standby]), timeout=120, interval=1, message="the standby resumes")
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    finally:
        subprocess.run([helm, "uninstall", "peer", "-n", system], env=cluster.env(), capture_output=True)
        cluster.kubectl("delete", "namespace", system, "--wait=false", check=False)
