"""`helm install` of the chart (built helm, real apiserver): CRDs, operator and router with least-privilege
RBAC and restricted pod security; `helm uninstall` removes them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.cluster
CHART = Path(__file__).resolve().parents[2] / "charts" / "loraserve"


def helm(cluster: LocalCluster, *args: str) -> str:
    result = subprocess.run(
        [cluster.binary("helm"), *args], env=cluster.env(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def can(cluster: LocalCluster, namespace: str, account: str, verb: str, resource: str) -> bool:
    resource, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{namespace}:{account}"]
    if sub:
        args.append(f"--subresource={sub}")
    out = cluster.kubectl(*args, check=False)
    return out.stdout.strip() == "yes"


def test_helm_install_and_uninstall(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    helm(cluster, "lint", str(CHART))
    helm(
        cluster,
        "install",
        "ls",
        str(CHART),
        "-n",
        namespace,
        "--set",
        "operator.nodeSelector.serving\\.loraserve\\.dev/local-node=fake",
        "--set",
        "router.nodeSelector.serving\\.loraserve\\.dev/local-node=fake",
    )
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout
    for name in (
        "deployments.serving.loraserve.dev",
        "loraaddons.serving.loraserve.dev",
        "modelversions.serving.loraserve.dev",
        "clusterkopfpeerings.kopf.dev",
    ):
        assert name in crds

    def running() -> bool:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        names = {
            p["metadata"]["labels"].get("app.kubernetes.io/name") for p in pods if p["status"].get("phase") == "Running"
        }
        return names == {"loraserve-operator", "loraserve-router"}

    # The restricted namespace admitted the pods: non-root, no privilege escalation, read-only root fs.
    wait_for(running, timeout=60, message="operator and router pods")

    op, router = "ls-operator", "ls-router"
    assert can(cluster, namespace, op, "patch", "deployments.serving.loraserve.dev/status")
    assert can(cluster, namespace, op, "create", "deployments.apps")
    assert can(cluster, namespace, op, "create", "deployments.serving.loraserve.dev")  # the serverless pool
    assert can(cluster, namespace, op, "create", "secrets")  # model-server tokens: written, never read
    assert not can(cluster, namespace, op, "list", "secrets")
    assert can(cluster, namespace, op, "patch", "deployments.serving.loraserve.dev/scale")
    assert not can(cluster, namespace, op, "get", "secrets")
    assert not can(cluster, namespace, op, "create", "pods")
    assert not can(cluster, namespace, op, "delete", "deployments.apps")
    assert can(cluster, namespace, router, "watch", "endpointslices.discovery.k8s.io")
    assert can(cluster, namespace, router, "patch", "deployments.serving.loraserve.dev/scale")
    assert not can(cluster, namespace, router, "patch", "deployments.serving.loraserve.dev")
    assert not can(cluster, namespace, router, "patch", "deployments.serving.loraserve.dev/status")
    assert not can(cluster, namespace, router, "list", "secrets")

    helm(cluster, "uninstall", "ls", "-n", namespace, "--wait")
    left = cluster.kubectl("get", "deployments.apps", "-n", namespace, "-o", "name").stdout
    assert left.strip() == ""


def test_watch_namespaces_get_their_own_peering_objects(cluster: LocalCluster) -> None:
    """Kopf looks for a namespaced KopfPeering in each watched namespace: the chart must create them, or every
    operator replica acts."""
    out = helm(cluster, "template", "ls", str(CHART), "-n", "sys", "--set", "operator.watchNamespaces={team-a,team-b}")
    docs = [d for d in yaml.safe_load_all(out) if d]
    peerings = sorted((d["kind"], d["metadata"].get("namespace")) for d in docs if "Peering" in d["kind"])
    assert peerings == [("KopfPeering", "team-a"), ("KopfPeering", "team-b")]
    operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ls-operator")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args
    assert "--namespace=team-b" in args
    router = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ls-router")
    router_args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--namespace=team-a", "--namespace=team-b"} <= set(router_args)  # serves what the operator manages
    everywhere = [d for d in yaml.safe_load_all(helm(cluster, "template", "ls", str(CHART), "-n", "sys")) if d]
    assert [d["kind"] for d in everywhere if "Peering" in d["kind"]] == ["ClusterKopfPeering"]
