"""Fake GPU nodes for the local runtime: what a kubelet would do, minus containers.

Nodes labelled `serving.loraserve.dev/local-node=<pool>` get heartbeats (Lease + Ready condition), so the
node-lifecycle controller keeps them schedulable. Every pod the scheduler binds to them is reported Running
and Ready with an IP from the node's podCIDR; a deleted pod is removed at once. GPU capacity is real to the
scheduler (`nvidia.com/gpu`, `amd.com/gpu`), so a pod that asks for GPUs nobody has stays Pending as
Unschedulable, exactly as in a GPU cluster out of stock.

    python -m loraserve.local.nodeagent --kubeconfig KUBECONFIG
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import logging
import os
import secrets
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from loraserve.local.runtime import Bridge, PodNetwork, PodRunner

LOCAL_NODE_LABEL = "serving.loraserve.dev/local-node"
POOL_TAINT = "serving.loraserve.dev/local-pool"
ACCELERATOR_LABEL = "serving.loraserve.dev/accelerator"
REGION_LABEL = "topology.kubernetes.io/region"
GPU_RESOURCE = {
    "NVIDIA_A100_80GB": "nvidia.com/gpu",
    "NVIDIA_H100_80GB": "nvidia.com/gpu",
    "AMD_MI300X_192GB": "amd.com/gpu",
}
HEARTBEAT_SECONDS = 5.0
log = logging.getLogger("loraserve.nodeagent")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_manifest(
    name: str, accelerator: str, gpus: int, region: str, pod_cidr: str, pool: str = "fake", tainted: bool | None = None
) -> dict[str, Any]:
    """A fake GPU node. A node of a pool other than "fake" is tainted for that pool unless `tainted=False`
    (the local stack's only node, where any Deployment must land as on a cluster)."""
    taint = pool != "fake" if tainted is None else tainted
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                LOCAL_NODE_LABEL: pool,
                ACCELERATOR_LABEL: accelerator,
                REGION_LABEL: region,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {
            "podCIDR": pod_cidr,
            "podCIDRs": [pod_cidr],
            # Pods only land on a node of another pool (e.g. one that really runs them) when they ask to.
            "taints": [{"key": POOL_TAINT, "value": pool, "effect": "NoSchedule"}] if taint else [],
        },
    }


def node_status(accelerator: str, gpus: int) -> dict[str, Any]:
    capacity = {
        "cpu": "64",
        "memory": "512Gi",
        "pods": "110",
        "ephemeral-storage": "1Ti",
        GPU_RESOURCE[accelerator]: str(gpus),
    }
    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [_ready_condition()],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": "v1.36.3",
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "loraserve-local://0",
            "kernelVersion": "",
            "osImage": "loraserve local node",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    }


def _ready_condition() -> dict[str, str]:
    now = _now()
    return {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "loraserve local node agent is posting ready status",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }


def register_node(
    core: Any,
    name: str,
    accelerator: str,
    gpus: int,
    region: str,
    pod_cidr: str,
    pool: str = "fake",
    tainted: bool | None = None,
) -> None:
    """Create (or keep) a fake GPU node; the agent of that pool then keeps it Ready."""
    try:
        core.create_node(node_manifest(name, accelerator, gpus, region, pod_cidr, pool, tainted))
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    core.patch_node_status(name, {"status": node_status(accelerator, gpus)})


class NodeAgent:
    """Plays kubelet for the local nodes. With `run_dir`, pods really run (see loraserve.local.runtime);
    without it, they are only reported Running and Ready (enough for control-plane tests)."""

    def __init__(
        self,
        api: client.ApiClient,
        run_dir: Path | None = None,
        vllm_python: str | None = None,
        pool: str = "fake",
        bridge: str | None = None,
    ) -> None:
        # The client's generated types add nothing here: the agent speaks plain dict patches.
        self.core: Any = client.CoreV1Api(api)
        self.coordination: Any = client.CoordinationV1Api(api)
        self.stopped = threading.Event()
        self._next_ip: dict[str, int] = {}
        self._lock = threading.Lock()
        self.api: Any = api
        self.run_dir = run_dir
        self.vllm_python = vllm_python
        # The pods' namespaces are named after the bridge: a known name lets a supervisor find them again.
        self.bridge = Bridge(bridge or f"lsbr{secrets.token_hex(2)}") if run_dir else None
        self.runners: dict[str, PodRunner] = {}
        self.terminating: set[str] = set()  # pod uids deleted through the API, stopping in their grace period
        self.pool = pool

    # -- nodes --------------------------------------------------------------------------------------------
    def local_nodes(self) -> list[Any]:
        return list(self.core.list_node(label_selector=f"{LOCAL_NODE_LABEL}={self.pool}").items)

    def heartbeat_once(self) -> None:
        for node in self.local_nodes():
            name = node.metadata.name
            conditions = [c for c in (node.status.conditions or []) if c.type == "Ready"]
            ready = _ready_condition()
            if conditions and conditions[0].status == "True":
                ready["lastTransitionTime"] = conditions[0].last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ")
            self.core.patch_node_status(name, {"status": {"conditions": [ready]}})
            self._renew_lease(name, node.metadata.uid)

    def _renew_lease(self, name: str, uid: str) -> None:
        now = datetime.now(UTC)
        body = {
            "metadata": {
                "name": name,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}],
            },
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now.isoformat()},
        }
        try:
            self.coordination.patch_namespaced_lease(name, "kube-node-lease", body)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def heartbeat_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self.heartbeat_once()
            except Exception:  # keep beating: a transient apiserver error must not kill the node
                log.exception("heartbeat failed")
            self.stopped.wait(HEARTBEAT_SECONDS)

    # -- pods ---------------------------------------------------------------------------------------------
    def allocate_ip(self, node: Any) -> str:
        network = ipaddress.ip_network(node.spec.pod_cidr)
        with self._lock:
            n = self._next_ip.get(node.metadata.name, 2)
            self._next_ip[node.metadata.name] = n + 1
        return str(network[n % (network.num_addresses - 2) + 1])

    def handle_pod(self, pod: Any, nodes: dict[str, Any]) -> None:
        node = nodes.get(pod.spec.node_name or "")
        if node is None:
            return
        if self.run_dir is not None:
            self._handle_real_pod(pod, node)
            return
        if pod.metadata.deletion_timestamp is not None:
            self._remove(pod)
            return
        if pod.status.phase == "Running":
            return
        self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, self.running_status(pod, node))

    def _remove(self, pod: Any) -> None:
        """What the kubelet does once a deleted pod's containers are gone: remove the object."""
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    # -- pods that really run ------------------------------------------------------------------------------
    def _handle_real_pod(self, pod: Any, node: Any) -> None:
        uid = pod.metadata.uid
        if uid in self.terminating:
            return  # its preStop hooks and grace period are running
        runner = self.runners.get(uid)
        if pod.metadata.deletion_timestamp is not None:
            if runner is None:
                self._remove(pod)
                return
            self.runners.pop(uid, None)
            self.terminating.add(uid)
            grace = pod.metadata.deletion_grace_period_seconds
            if grace is None:
                grace = pod.spec.termination_grace_period_seconds or 30
            threading.Thread(target=self._terminate, args=(runner, pod, float(grace)), daemon=True).start()
            return
        if runner is not None:
            return
        assert self.run_dir is not None
        assert self.bridge is not None
        ip = self.allocate_ip(node)
        network = PodNetwork.create(self.bridge, uid[:8], ip, node.spec.pod_cidr)
        body = self.api.sanitize_for_serialization(pod)
        runner = PodRunner(
            body,
            network,
            self.run_dir / "pods" / uid,
            self.vllm_python,
            self._secret_value,
            self._report,
            extra_env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
        )
        self.runners[uid] = runner
        runner.start()

    def _terminate(self, runner: PodRunner, pod: Any, grace: float) -> None:
        """A deleted pod: its preStop hooks and grace period, then the object goes (off the watch thread)."""
        try:
            runner.stop(grace)
            self._remove(pod)
        finally:
            self.terminating.discard(pod.metadata.uid)

    def forget_deleted(self, pod: Any) -> None:
        runner = self.runners.pop(pod.metadata.uid, None)
        if runner is not None:
            runner.stop()

    def _secret_value(self, namespace: str, name: str, key: str) -> str | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except client.ApiException:
            return None
        data = (secret.data or {}).get(key)
        return base64.b64decode(data).decode() if data is not None else None

    def _report(self, runner: PodRunner) -> None:
        now = _now()
        containers, inits = runner.container_statuses()
        ready = runner.initialized and all(c["ready"] for c in containers)
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": str(runner.initialized), "lastTransitionTime": now},
            {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": now},
            {"type": "Ready", "status": str(ready), "lastTransitionTime": now},
        ]
        meta = runner.pod["metadata"]
        status = {
            "phase": "Running" if runner.initialized else "Pending",
            "hostIP": "127.0.0.1",
            "podIP": runner.network.ip,
            "podIPs": [{"ip": runner.network.ip}],
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": containers,
            "initContainerStatuses": inits,
        }
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
        except client.ApiException as exc:
            if exc.status != 404:
                log.warning("status of pod %s/%s not written: %s", meta["namespace"], meta["name"], exc.reason)

    def stop_all(self) -> None:
        for runner in list(self.runners.values()):
            runner.stop()
        self.runners.clear()
        if self.bridge is not None:
            self.bridge.delete()

    def running_status(self, pod: Any, node: Any) -> dict[str, Any]:
        now = _now()
        ip = self.allocate_ip(node)
        started = {"running": {"startedAt": now}}
        containers = [
            {
                "name": c.name,
                "image": c.image,
                "imageID": c.image,
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": started,
            }
            for c in pod.spec.containers
        ]
        inits = [
            {
                "name": c.name,
                "image": c.image,
                "imageID": c.image,
                "ready": True,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}},
            }
            for c in (pod.spec.init_containers or [])
        ]
        conditions = [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("PodScheduled", "Initialized", "PodReadyToStartContainers", "ContainersReady", "Ready")
        ]
        return {
            "status": {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": conditions,
                "containerStatuses": containers,
                "initContainerStatuses": inits,
            }
        }

    def pod_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                nodes = {n.metadata.name: n for n in self.local_nodes()}
                pods = self.core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=")
                for pod in pods.items:
                    self.handle_pod(pod, nodes)
                watcher: Any = watch.Watch()  # type: ignore[no-untyped-call]
                stream = watcher.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector="spec.nodeName!=",
                    resource_version=pods.metadata.resource_version,
                    timeout_seconds=30,
                )
                for event in stream:
                    if self.stopped.is_set():
                        return
                    pod = event["object"]
                    if event["type"] == "DELETED":
                        self.forget_deleted(pod)
                    else:
                        if pod.spec.node_name not in nodes:
                            nodes = {n.metadata.name: n for n in self.local_nodes()}
                        self.handle_pod(pod, nodes)
            except Exception:  # a watch that expires or errors is simply started again
                log.exception("pod watch failed; relisting")
                self.stopped.wait(1)

    def run(self) -> None:
        if self.bridge is not None:
            self.bridge.ensure()
        threads = [threading.Thread(target=t, daemon=True) for t in (self.heartbeat_loop, self.pod_loop)]
        for t in threads:
            t.start()
        try:
            while not self.stopped.is_set():
                self.stopped.wait(1)
        finally:
            self.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.local.nodeagent", description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME=ACCELERATOR:GPUS:REGION",
        help="register a node, e.g. gpu-a100-0=NVIDIA_A100_80GB:8:us-east-1 (repeatable)",
    )
    parser.add_argument("--pool", default="fake", help="manage the nodes labelled with this pool name")
    parser.add_argument("--untainted", action="store_true", help="no pool taint: any pod may land on the nodes")
    parser.add_argument("--bridge", help="name of the pods' bridge (15 characters at most; default: random)")
    parser.add_argument("--cidr-base", type=int, default=1, help="third octet of the first node's 10.244.X.0/24")
    parser.add_argument("--run-dir", type=Path, help="really run pods (vLLM, fetcher) under this directory; needs root")
    parser.add_argument(
        "--vllm-python", default=os.environ.get("LORASERVE_VLLM_PYTHON"), help="python of the vLLM venv"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.captureWarnings(True)  # the local apiserver's self-signed certificate: one warning per request otherwise
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    api = config.new_client_from_config(args.kubeconfig)  # type: ignore[no-untyped-call]
    core: Any = client.CoreV1Api(api)
    for i, item in enumerate(args.node):
        name, rest = item.split("=", 1)
        accelerator, gpus, region = rest.split(":")
        cidr = f"10.244.{args.cidr_base + i}.0/24"
        register_node(core, name, accelerator, int(gpus), region, cidr, args.pool, False if args.untainted else None)
    agent = NodeAgent(api, args.run_dir, args.vllm_python, args.pool, args.bridge)
    signal.signal(signal.SIGTERM, lambda *_: agent.stopped.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopped.set())
    agent.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
