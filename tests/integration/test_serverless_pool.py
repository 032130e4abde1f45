"""LoraAddons without a Deployment go to the shared serverless pool of their base model, created on first
use; the pool seats 100 addons and refuses the 101st with a clear reason."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from loraserve.addons import pool_name
from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import Operator, wait_for

pytestmark = pytest.mark.cluster
API = "serving.loraserve.dev/v1alpha1"
BASE = "hf://org/pool-base"


def status(cluster: LocalCluster, ns: str, kind: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout).get("status") or {} if out.returncode == 0 else {}


def test_serverless_pool_created_on_first_use_and_capped(
    cluster: LocalCluster, operator: Operator, namespace: str
) -> None:
    version = {
        "apiVersion": API,
        "kind": "ModelVersion",
        "metadata": {"name": "shared-v1"},
        "spec": {
            "version": "v1",
            "baseModel": {"name": BASE, "revision": "r1"},
            "adapter": {"uri": "s3://adapters/shared"},
        },
    }
    addons = [
        {
            "apiVersion": API,
            "kind": "LoraAddon",
            "metadata": {"name": f"a{i:03d}"},
            "spec": {"targets": [{"modelVersion": "shared-v1", "weight": 100}]},
        }
        for i in range(101)
    ]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([version, *addons]))
    pool = pool_name(BASE)

    first = wait_for(
        lambda: (
            status(cluster, namespace, "addon", "a000").get("deployment") == pool
            and status(cluster, namespace, "addon", "a000")
        ),
        timeout=90,
        message="a000 seated",
    )
    assert first["state"] == "PENDING"  # the pool is at zero replicas: adapters load as replicas come
    spec = json.loads(cluster.kubectl("get", "lsd", pool, "-n", namespace, "-o", "json").stdout)["spec"]
    assert (spec["baseModel"], spec["enableAddons"], spec["minReplicas"]) == (BASE, True, 0)

    last = wait_for(
        lambda: (
            status(cluster, namespace, "addon", "a100").get("state") == "FAILED"
            and status(cluster, namespace, "addon", "a100")
        ),
        timeout=180,
        message="a100 refused",
    )
    stalled = next(c for c in last["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "ServerlessPoolFull"
    assert pool in stalled["message"]
    wait_for(lambda: status(cluster, namespace, "addon", "a099").get("state") == "PENDING", timeout=120, message="a099")
    pools = cluster.kubectl(
        "get", "lsd", "-n", namespace, "-l", "serving.loraserve.dev/serverless-pool=true", "-o", "name"
    )
    assert pools.stdout.split() == [f"deployment.serving.loraserve.dev/{pool}"]
