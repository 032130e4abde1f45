"""HA on the real control plane: the chart's two operator replicas, run as the chart's ServiceAccount with the
chart's args. Exactly one acts; SIGKILLed while its Deployments are READY and the autoscaler is inside its
windows, the standby takes over within the peering lifetime, rewrites none of the children, posts no state
Event twice, and rebuilds the autoscaler's clocks: no scale-down before the down-window has passed since the
load fell, no scale to zero of a deployment whose zero window has just begun (also counting a request served
while no operator acted)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.harness import operator_acting, rendered_container, service_account_kubeconfig

from loraserve.local.cluster import LocalCluster
from loraserve.peering import STANDING_BY
from tests.integration.conftest import LOAD_PORT, LoadSource, Operator, apply, get, status, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
CHART = Path(__file__).resolve().parents[2] / "charts" / "loraserve"
GROUP = "serving.loraserve.dev"
DOWN_WINDOW = 60.0


def deployment(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"baseModel": "hf://org/model", **spec},
    }


def spec_replicas(cluster: LocalCluster, ns: str, name: str) -> int | None:
    obj = get(cluster, ns, "lsd", name)
    return None if obj is None else obj["spec"].get("replicas")


def ready(cluster: LocalCluster, ns: str, name: str, replicas: int) -> bool:
    st = status(cluster, ns, "lsd", name)
    return st.get("state") == "READY" and st.get("readyReplicas") == replicas


def children(cluster: LocalCluster, ns: str, names: list[str]) -> dict[str, Any]:
    """What a rewrite of a child would change: resourceVersion and generation of each Deployment and Service,
    and the CRs' generation and spec.replicas."""
    out: dict[str, Any] = {}
    for name in names:
        for kind in ("deployments.apps", "services", "lsd"):
            meta = get(cluster, ns, kind, name)
            out[f"{kind}/{name}"] = (
                meta["metadata"]["resourceVersion"] if kind != "lsd" else None,
                meta["metadata"].get("generation"),
                meta["spec"].get("replicas"),
            )
    return out


def state_events(cluster: LocalCluster, ns: str) -> Counter[tuple[str, str]]:
    """(object, reason) of the Events the operator posted about its CRs, except Kopf's handler log lines."""
    items = get(cluster, ns, "events")["items"]
    return Counter(
        (e["involvedObject"]["name"], e["reason"])
        for e in items
        if e["involvedObject"].get("apiVersion", "").startswith(GROUP) and e["reason"] != "Logging"
    )


def epoch(text: str | None) -> float:
    return datetime.fromisoformat((text or "1970-01-01T00:00:00Z").replace("Z", "+00:00")).timestamp()


def test_standby_takes_over_without_redoing_or_undoing_anything(
    cluster: LocalCluster, sole_operator: Operator, load_source: LoadSource, namespace: str, tmp_path: Path
) -> None:
    # The suite's cluster-wide operator is stopped (sole_operator, never started): only the chart's two replicas act.
    ns, system = namespace, f"{namespace}-sys"
    helm = cluster.binary("helm")
    install = [helm, "install", "ha", str(CHART), "-n", system, "--create-namespace"]
    install += ["--set", f"operator.watchNamespaces={{{ns}}}", "--wait=false"]
    subprocess.run(install, env=cluster.env(), check=True, capture_output=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        manifest = subprocess.run(
            [helm, "get", "manifest", "ha", "-n", system], env=cluster.env(), check=True, capture_output=True
        ).stdout
        container, pod = rendered_container([d for d in yaml.safe_load_all(manifest) if d], "ha-operator")
        assert pod["_replicas"] == 2
        args = [a for a in container["args"] if not a.startswith(("--liveness", "--metrics-port"))]
        chart_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        kubeconfig = service_account_kubeconfig(cluster, "ha-operator", tmp_path / "kubeconfig", system)
        env = {
            **cluster.env(),
            "KUBECONFIG": str(kubeconfig),
            "LORASERVE_PEERING_LIFETIME": chart_env["LORASERVE_PEERING_LIFETIME"],  # the chart's default
            "LORASERVE_ROUTER_LOAD_URLS": f"http://127.0.0.1:{LOAD_PORT}/load",  # load the test sets
            "LORASERVE_AUTOSCALE_TICK": "1",
        }
        logs = [tmp_path / f"operator-{i}.log" for i in range(2)]

        def text(i: int) -> str:
            return logs[i].read_text(errors="replace") if logs[i].exists() else ""

        for i, log in enumerate(logs):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "loraserve.cli.main", *args, "--verbose"],
                    env=env,
                    stdout=open(log, "wb"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                )
            )
            # the first one to start is the elder, which acts
            wait_for(lambda: STANDING_BY in text(i), message=f"operator {i} started")  # noqa: B023

        wait_for(lambda: [operator_acting(text(i)) for i in range(2)] == [True, False], message="the elder acts")

        # busy: 3 replicas for a load of 3, then idle inside its down-window; woken: min 0, awake since a request
        busy, woken = (ns, "busy"), (ns, "woken")
        windows = {"scaleUpWindow": "2s", "scaleDownWindow": f"{DOWN_WINDOW:.0f}s", "scaleToZeroWindow": "5m"}
        apply(cluster, ns, deployment("busy", minReplicas=1, maxReplicas=3, targetLoadPerReplica=1, **windows))
        apply(cluster, ns, deployment("woken", minReplicas=0, maxReplicas=1, **windows))
        load_source.in_flight[busy] = 3
        load_source.in_flight[woken] = 1
        load_source.last_request[woken] = time.time()
        wait_for(lambda: ready(cluster, ns, "busy", 3), timeout=120, message="busy READY with 3 replicas")
        wait_for(lambda: ready(cluster, ns, "woken", 1), timeout=120, message="woken READY with 1 replica")
        # The load falls; the router that saw woken's request restarts (its series is gone): only status keeps
        # woken's zero clock from here.
        load_source.in_flight[busy] = 0
        load_source.in_flight[woken] = 0
        del load_source.last_request[woken]
        dropped = time.time()
        wait_for(lambda: status(cluster, ns, "lsd", "woken").get("lastRequestTime"), message="woken's idle clock")
        time.sleep(5)  # a few quiet ticks inside the windows
        assert "applied apps/v1 Deployment" in text(0)
        assert "applied apps/v1 Deployment" not in text(1)  # the standby did nothing
        before = children(cluster, ns, ["busy", "woken"])
        events_before = state_events(cluster, ns)
        assert events_before[("busy", "Ready")] >= 1
        assert events_before[("woken", "Ready")] >= 1

        procs[0].kill()
        procs[0].wait()
        killed = time.monotonic()
        gap_request = time.time()
        load_source.last_request[woken] = gap_request  # a request served while no operator acts
        wait_for(lambda: operator_acting(text(1)), timeout=120, interval=0.2, message="the standby takes over")
        takeover = time.monotonic() - killed
        print(f"\ntakeover after SIGKILL: {takeover:.1f} s (peering lifetime {env['LORASERVE_PEERING_LIFETIME']})")

        # Until busy's down-window has passed since its load fell, nothing scales and nothing is rewritten.
        while time.time() < dropped + DOWN_WINDOW - 2:
            assert spec_replicas(cluster, ns, "busy") == 3, "scaled down before the down-window had passed"
            assert spec_replicas(cluster, ns, "woken") == 1, "scaled to zero inside the zero window"
            time.sleep(0.5)
        assert "applied apps/v1 Deployment" not in text(1)
        assert children(cluster, ns, ["busy", "woken"]) == before
        assert state_events(cluster, ns) == events_before
        assert ready(cluster, ns, "busy", 3)
        assert ready(cluster, ns, "woken", 1)
        # the request served during the takeover moved woken's zero clock (status keeps whole seconds, up)
        assert epoch(status(cluster, ns, "lsd", "woken").get("lastRequestTime")) >= math.floor(gap_request)

        # The new leader does act on the windows: busy goes down once it has watched a whole window itself.
        wait_for(lambda: spec_replicas(cluster, ns, "busy") == 1, timeout=DOWN_WINDOW + 60, message="busy down")
        assert epoch(status(cluster, ns, "lsd", "busy").get("lastScaleTime")) >= math.floor(dropped + DOWN_WINDOW)
        assert state_events(cluster, ns)[("busy", "Scaled")] == events_before[("busy", "Scaled")] + 1
        assert spec_replicas(cluster, ns, "woken") == 1
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        subprocess.run([helm, "uninstall", "ha", "-n", system], env=cluster.env(), capture_output=True)
        cluster.kubectl("delete", "namespace", system, "--wait=false", check=False)
