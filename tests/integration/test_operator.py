"""The operator on the real control plane: Deployment CRs become apps/v1 Deployments, Services and pods
(restricted pod security, GPU requests, node selection), with honest status, rollouts, stockout recovery,
clean deletion and convergence after a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.harness import RUN_TOLERATION

from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import Operator, wait_for

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "multi-lora-deployment.yaml"


@pytest.fixture
def restricted_namespace(cluster: LocalCluster, namespace: str) -> str:
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    return namespace


def get(cluster: LocalCluster, namespace: str, *what: str) -> Any:
    result = cluster.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def cr_status(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    obj = get(cluster, namespace, "lsd", name)
    return (obj or {}).get("status") or {}


def state_is(cluster: LocalCluster, ns: str, name: str, state: str, ready: int | None = None) -> dict[str, Any] | None:
    """The status (one read) if it is in `state` (with `ready` ready replicas), else None."""
    status = cr_status(cluster, ns, name)
    if status.get("state") != state or (ready is not None and status.get("readyReplicas") != ready):
        return None
    return status


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items = get(cluster, namespace, "pods", "-l", f"serving.loraserve.dev/deployment={name}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def apply(cluster: LocalCluster, namespace: str, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def example(**spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"].update(spec)
    return doc


def test_example_becomes_vllm_pods_and_ready(
    cluster: LocalCluster, operator: Operator, restricted_namespace: str
) -> None:
    ns = restricted_namespace
    cluster.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    # minReplicas 0 and no traffic: the child exists at zero replicas and the CR says so.
    status = wait_for(lambda: state_is(cluster, ns, "llama-multi", "SCALED_TO_ZERO"), message="SCALED_TO_ZERO")
    assert condition(status, "Ready")["status"] == "True", status

    # The scale subresource (what the autoscaler and `kubectl scale` use) drives the child's replicas.
    cluster.kubectl("scale", "lsd", "llama-multi", "-n", ns, "--replicas=2")
    status = wait_for(lambda: state_is(cluster, ns, "llama-multi", "READY", 2), timeout=90, message="2 ready")
    assert status["observedGeneration"] == get(cluster, ns, "lsd", "llama-multi")["metadata"]["generation"]
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Reconciling")["status"] == "False"
    assert condition(status, "Stalled")["status"] == "False"
    assert status["accelerator"] == "NVIDIA_A100_80GB x1"

    child = get(cluster, ns, "deployment.apps", "llama-multi")
    owner = child["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("Deployment", "llama-multi", True)
    assert child["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_spec = child["spec"]["template"]["spec"]
    vllm = next(c for c in pod_spec["containers"] if c["name"] == "vllm")
    assert vllm["args"][:5] == [
        "--model=/models/base",
        "--served-model-name=Llama-3.1-8B-Instruct",
        "--host=0.0.0.0",
        "--port=8000",
        "--tensor-parallel-size=1",
    ]
    assert vllm["args"][5:] == ["--enable-lora", "--max-loras=8", "--max-lora-rank=16"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod_spec["nodeSelector"] == {"serving.loraserve.dev/accelerator": "NVIDIA_A100_80GB"}
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    # The HF token comes from the Secret by reference; its value is nowhere in the CR or the pod spec.
    hf = next(e for e in vllm["env"] if e["name"] == "HF_TOKEN")
    assert hf["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN", "optional": True}
    fetch = pod_spec["initContainers"][0]
    assert fetch["args"][:3] == ["fetch", "--uri=hf://meta-llama/Llama-3.1-8B-Instruct", "--dest=/models/base"]

    service = get(cluster, ns, "service", "llama-multi")
    assert service["spec"]["selector"] == child["spec"]["selector"]["matchLabels"]
    running = pods(cluster, ns, "llama-multi")
    assert len(running) == 2
    assert all(p["spec"]["nodeName"] == "gpu-a100-0" for p in running)
    # EndpointSlices come from the real controller: the router reaches pods exactly as in a cluster. The
    # controller follows the pods on its own schedule, so a slice may trail the CR's READY by a moment.
    ips = {p["status"]["podIP"] for p in running}

    def addresses() -> set[str]:
        slices = get(cluster, ns, "endpointslices", "-l", "kubernetes.io/service-name=llama-multi")["items"]
        return {a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]}

    wait_for(lambda: addresses() == ips, timeout=30, message=lambda: f"slices {addresses()} of pods {ips}")

    # Events tell a person what happened.
    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=llama-multi").stdout
    assert "Ready" in events


def test_edit_rolls_pods_without_dropping_capacity(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    apply(cluster, namespace, example(minReplicas=2, maxReplicas=2))
    wait_for(lambda: cr_status(cluster, namespace, "llama-multi").get("state") == "READY", timeout=90, message="READY")
    before = {p["metadata"]["name"] for p in pods(cluster, namespace, "llama-multi")}
    generation = get(cluster, namespace, "lsd", "llama-multi")["metadata"]["generation"]

    apply(cluster, namespace, example(minReplicas=2, maxReplicas=2, maxLoras=6))
    lowest_ready = 2

    def rolled() -> bool:
        nonlocal lowest_ready
        status = cr_status(cluster, namespace, "llama-multi")
        lowest_ready = min(
            lowest_ready, get(cluster, namespace, "deployment.apps", "llama-multi")["status"].get("readyReplicas", 0)
        )
        now = {p["metadata"]["name"] for p in pods(cluster, namespace, "llama-multi")}
        return (
            status.get("observedGeneration") == generation + 1 and status.get("state") == "READY" and not (now & before)
        )

    wait_for(rolled, timeout=120, message="rollout to new pods")
    args = next(c for c in pods(cluster, namespace, "llama-multi")[0]["spec"]["containers"] if c["name"] == "vllm")[
        "args"
    ]
    assert "--max-loras=6" in args
    assert lowest_ready >= 2  # maxUnavailable 0: ready capacity never dropped


def test_delete_removes_everything(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    apply(cluster, namespace, example(minReplicas=1))
    wait_for(lambda: cr_status(cluster, namespace, "llama-multi").get("state") == "READY", timeout=90, message="READY")
    cluster.kubectl("delete", "lsd", "llama-multi", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: (
            get(cluster, namespace, "deployment.apps", "llama-multi") is None
            and get(cluster, namespace, "service", "llama-multi") is None
            and not pods(cluster, namespace, "llama-multi")
        ),
        timeout=90,
        message="children garbage-collected",
    )


def test_gpu_stockout_then_recovery(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    doc = example(minReplicas=1, acceleratorType="AMD_MI300X_192GB")
    doc["metadata"]["name"] = "mi300"
    # Tolerating the local run pool's taint, every node refuses it for its labels alone (no MI300X anywhere), as
    # the scheduler says: "didn't match Pod's node affinity/selector". A taint in the mix would make it ambiguous.
    doc["spec"]["tolerations"] = [RUN_TOLERATION]
    apply(cluster, namespace, doc)
    status = wait_for(
        lambda: (
            condition(cr_status(cluster, namespace, "mi300"), "Stalled").get("status") == "True"
            and cr_status(cluster, namespace, "mi300")
        ),
        timeout=60,
        message="Stalled",
    )
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "GPUStockout"
    assert "nodes are available" in stalled["message"]  # the scheduler's own words
    assert status["state"] == "FAILED"
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=mi300").stdout
    assert "GPUStockout" in events

    # Capacity appears: an AMD node joins. Nobody touches the CR; it recovers by itself.
    agent = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from kubernetes import client, config; from loraserve.local.nodeagent import register_node;"
            "api = config.new_client_from_config(sys.argv[1]);"
            "register_node(client.CoreV1Api(api), 'gpu-mi300x-0', 'AMD_MI300X_192GB', 8, 'us-east-1', '10.244.9.0/24')",
            str(cluster.kubeconfig),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert agent.returncode == 0
    status = wait_for(
        lambda: (
            cr_status(cluster, namespace, "mi300").get("state") == "READY" and cr_status(cluster, namespace, "mi300")
        ),
        timeout=120,
        message="recovery",
    )
    assert condition(status, "Stalled")["status"] == "False"
    assert all(p["spec"]["nodeName"] == "gpu-mi300x-0" for p in pods(cluster, namespace, "mi300"))
    vllm = pods(cluster, namespace, "mi300")[0]["spec"]["containers"][0]
    assert vllm["resources"]["limits"]["amd.com/gpu"] in (1, "1")


def test_operator_restart_mid_reconcile_converges(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    operator.kill()
    try:
        for i in range(3):
            doc = example(minReplicas=1)
            doc["metadata"]["name"] = f"restart-{i}"
            apply(cluster, namespace, doc)
        operator.start()
        # Kill it again while it is in the middle of creating children, then start it once more.
        wait_for(lambda: get(cluster, namespace, "deployment.apps", "restart-0") is not None, message="first child")
        operator.kill()
        operator.start()
        for i in range(3):
            wait_for(
                lambda i=i: cr_status(cluster, namespace, f"restart-{i}").get("state") == "READY",
                timeout=120,
                message=f"restart-{i} READY",
            )
    finally:
        if operator.proc is None:
            operator.start()
    children = get(cluster, namespace, "deployment.apps")["items"]
    assert sorted(c["metadata"]["name"] for c in children) == ["restart-0", "restart-1", "restart-2"]
    assert len(get(cluster, namespace, "service")["items"]) == 3
    assert all(len(pods(cluster, namespace, f"restart-{i}")) == 1 for i in range(3))


def test_model_version_reports_ready(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "modelversions.yaml"))
    status = wait_for(
        lambda: (
            (get(cluster, namespace, "mv", "support-bot-v2") or {}).get("status", {}).get("state") == "READY"
            and get(cluster, namespace, "mv", "support-bot-v2")["status"]
        ),
        message="ModelVersion READY",
    )
    assert condition(status, "Ready")["status"] == "True"
    assert "s3://acme-adapters/support-bot/v2" in status["message"]


def test_a_pod_that_cannot_tolerate_the_taint_is_stalled_with_the_schedulers_reason(
    cluster: LocalCluster, operator: Operator, run_pool: str, namespace: str
) -> None:
    # A Deployment written without the run pool's toleration: its only matching node is tainted. The user
    # sees why at once (Stalled, the scheduler's own words), not "0/1 replicas ready" for as long as one waits.
    wait_for(
        lambda: "cpu-run-0" in cluster.kubectl("get", "nodes", "-o", "name").stdout, timeout=60, message="run node"
    )
    doc = example(minReplicas=1)
    doc["metadata"]["name"] = "untolerated"
    doc["spec"]["region"] = run_pool
    apply(cluster, namespace, doc)
    status = wait_for(
        lambda: condition(s := cr_status(cluster, namespace, "untolerated"), "Stalled").get("status") == "True" and s,
        timeout=60,
        message="Stalled",
    )
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "Unschedulable", stalled["message"]  # not GPUStockout: GPUs are not what is missing
    assert "untolerated taint" in stalled["message"]
    assert status["message"].startswith("Unschedulable: ")
    cluster.kubectl("delete", "lsd", "untolerated", "-n", namespace)


def test_each_way_a_replica_cannot_start_is_stalled_with_its_reason(
    cluster: LocalCluster, operator: Operator, run_pool: str, namespace: str, tiny_model: Path
) -> None:
    def on_run_pool(name: str, **spec: Any) -> dict[str, Any]:
        doc = example(minReplicas=1, region=run_pool, tolerations=[RUN_TOLERATION], **spec)
        doc["metadata"]["name"] = name
        doc["spec"]["baseModel"] = f"file://{tiny_model}"
        return doc

    def stalled(name: str) -> dict[str, Any]:
        status: dict[str, Any] = wait_for(
            lambda: condition(s := cr_status(cluster, namespace, name), "Stalled").get("status") == "True" and s,
            timeout=180,
            message=f"{name} Stalled",
        )
        return condition(status, "Stalled")

    # More CPU than any node has: the scheduler's words, not a GPU stockout.
    apply(cluster, namespace, on_run_pool("greedy", resources={"requests": {"cpu": "4000"}}))
    # vLLM refuses a flag it does not know and exits; restarted with the kubelet's back-off, it crash-loops.
    apply(cluster, namespace, on_run_pool("crashy", extraArgs=["--no-such-flag"]))

    greedy = stalled("greedy")
    assert greedy["reason"] == "Unschedulable", greedy["message"]
    assert "Insufficient cpu" in greedy["message"]
    crashy = stalled("crashy")
    assert crashy["reason"] == "ModelServerFailing", crashy["message"]
    assert "CrashLoopBackOff" in crashy["message"]
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=crashy").stdout
    assert "ModelServerFailing" in events
    cluster.kubectl("delete", "lsd", "greedy", "crashy", "-n", namespace)
