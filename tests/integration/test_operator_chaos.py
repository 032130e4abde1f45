"""The operator SIGKILLed at random points while Deployments are created, updated and deleted (at least 50
operations): once it runs again everything converges, every child made for a CR that still exists reflects
its last spec, and nothing is left for a CR that is gone. Seeded: LORASERVE_CHAOS_SEED replays a run."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import pytest
import yaml

from loraserve.api.naming import LABEL_MANAGED_BY, MANAGED_BY
from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import Operator, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
OPERATIONS = 60
API = "serving.loraserve.dev/v1alpha1"


def deployment(name: str, seed: int) -> dict[str, Any]:
    # minReplicas 0 and no traffic: the child is made at zero replicas, so the test is about the operator.
    return {
        "apiVersion": API,
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"baseModel": "hf://org/tiny-llama", "enableAddons": True, "extraArgs": [f"--seed={seed}"]},
    }


def listed(cluster: LocalCluster, ns: str, kind: str, selector: str | None = None) -> list[dict[str, Any]]:
    args = ["get", kind, "-n", ns, "-o", "json", *(["-l", selector] if selector else [])]
    items: list[dict[str, Any]] = json.loads(cluster.kubectl(*args).stdout)["items"]
    return items


def converged(cluster: LocalCluster, ns: str, live: dict[str, int]) -> str | None:
    """None when the cluster is as `live` says, else what is still off (for the timeout message)."""
    crs = {c["metadata"]["name"]: c for c in listed(cluster, ns, "lsd")}
    if set(crs) != set(live):
        return f"CRs {sorted(crs)} != {sorted(live)}"
    for name, cr in crs.items():
        if (cr.get("status") or {}).get("observedGeneration") != cr["metadata"]["generation"]:
            return f"{name}: status not caught up"
    managed = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    children = {d["metadata"]["name"]: d for d in listed(cluster, ns, "deployment.apps", managed)}
    services = {s["metadata"]["name"] for s in listed(cluster, ns, "service", managed)}
    if set(children) != set(live) or services != set(live):
        return f"children {sorted(children)}, services {sorted(services)} != {sorted(live)}"
    for name, seed in live.items():
        vllm = children[name]["spec"]["template"]["spec"]["containers"][0]
        if f"--seed={seed}" not in vllm["args"]:
            return f"{name}: child still has {vllm['args'][-1]}, not --seed={seed}"
        owners = children[name]["metadata"].get("ownerReferences") or []
        if [o["uid"] for o in owners] != [crs[name]["metadata"]["uid"]]:
            return f"{name}: child owned by {owners}"
    return None


def test_operator_killed_at_random_points_converges(
    cluster: LocalCluster, sole_operator: Operator, namespace: str
) -> None:
    ns = namespace
    seed = int(os.environ.get("LORASERVE_CHAOS_SEED", "13"))
    rng = random.Random(seed)
    op = sole_operator
    op.start()
    live: dict[str, int] = {}
    created = kills = 0
    try:
        for step in range(OPERATIONS):
            if not live or (len(live) < 6 and rng.random() < 0.4):
                name = f"chaos-{created}"  # never reused: a deleted name may still be finalizing
                created += 1
                doc = deployment(name, step)
                cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
                live[name] = step
            elif rng.random() < 0.3:
                name = rng.choice(sorted(live))
                cluster.kubectl("delete", "lsd", name, "-n", ns, "--wait=false")
                del live[name]
            else:
                name = rng.choice(sorted(live))
                patch = json.dumps({"spec": {"extraArgs": [f"--seed={step}"]}})
                cluster.kubectl("patch", "lsd", name, "-n", ns, "--type=merge", "-p", patch)
                live[name] = step
            if rng.random() < 0.3:
                # Somewhere in the middle of whatever the operator is doing for the last few operations.
                time.sleep(rng.uniform(0.0, 2.0))
                op.kill()  # SIGKILL: no cleanup, no finalizer removal, no status write
                kills += 1
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0.0, 1.0))
                    op.start()
            if op.proc is None and rng.random() < 0.5:
                op.start()
        if op.proc is None:
            op.start()
        wait_for(lambda: converged(cluster, ns, live) is None, timeout=240, interval=1, message="convergence")
    finally:
        op.kill()
    print(f"chaos seed {seed}: {OPERATIONS} operations, {kills} SIGKILLs, {created} created, {len(live)} left")
    assert kills >= 10
    # Nothing the operator made outlives its CR: the children of deleted CRs are gone (owner references).
    gone = {f"chaos-{i}" for i in range(created)} - set(live)
    left = {d["metadata"]["name"] for d in listed(cluster, ns, "deployment.apps")} & gone
    assert not left
