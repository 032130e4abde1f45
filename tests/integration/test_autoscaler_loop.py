"""The autoscaler loop in the real operator on the real control plane, fed a load the test controls (the
router's in-flight metric), with short windows: up after the up-window, down after the down-window."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import LoadSource, Operator, wait_for

pytestmark = pytest.mark.cluster


def spec_replicas(cluster: LocalCluster, ns: str, name: str) -> int:
    out = cluster.kubectl("get", "lsd", name, "-n", ns, "-o", "json", check=False)
    return int(json.loads(out.stdout)["spec"].get("replicas", -1)) if out.returncode == 0 else -1


def test_load_drives_replicas_through_the_windows(
    cluster: LocalCluster, operator: Operator, load_source: LoadSource, namespace: str
) -> None:
    doc: dict[str, Any] = {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": "loop"},
        "spec": {
            "baseModel": "hf://org/model",
            "minReplicas": 1,
            "maxReplicas": 4,
            "targetLoadPerReplica": 2,
            "scaleUpWindow": "4s",
            "scaleDownWindow": "8s",
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    wait_for(lambda: spec_replicas(cluster, namespace, "loop") == 1, message="min replicas")
    key = (namespace, "loop")
    load_source.last_request[key] = time.time()
    load_source.in_flight[key] = 7  # ceil(7 / 2) = 4 replicas
    changed = time.monotonic()
    wait_for(lambda: spec_replicas(cluster, namespace, "loop") == 4, timeout=60, message="scale up to 4")
    assert time.monotonic() - changed >= 4  # not before the load held for the whole up-window
    load_source.in_flight[key] = 0
    changed = time.monotonic()
    wait_for(lambda: spec_replicas(cluster, namespace, "loop") == 1, timeout=60, message="scale down to min")
    assert time.monotonic() - changed >= 8
    status = json.loads(cluster.kubectl("get", "lsd", "loop", "-n", namespace, "-o", "json").stdout)["status"]
    assert status["scaleReason"].startswith("ScaleDown")
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=loop").stdout
    assert "ScaleUp" in events
    assert "ScaleDown" in events

    # Idle now: the autoscaler looks when the routers see traffic or a deadline comes, not every tick (1 s).
    def pods() -> int:
        return len(json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"])

    wait_for(lambda: pods() == 1, timeout=60, message="the replicas scaled down are gone")
    looks = f"{namespace}/loop: load "
    before = operator.log.read_text(errors="replace").count(looks)
    time.sleep(12)
    idle_looks = operator.log.read_text(errors="replace").count(looks) - before
    assert idle_looks <= 3, f"{idle_looks} autoscaler looks in 12 idle seconds"
    load_source.last_request[key] = time.time()
    load_source.in_flight[key] = 7  # traffic again: looked at at once, and scaled up after the up-window
    wait_for(lambda: spec_replicas(cluster, namespace, "loop") == 4, timeout=60, message="scale up again")
