"""The operator's own Prometheus metrics about what it manages (served on `--metrics-port`).

The autoscaler's meters (`loraserve_gpu_seconds_total`, `loraserve_scale_decisions_total`) live beside the loop
that feeds them in `handlers/autoscaler.py`; these are the ones the Deployment and LoraAddon handlers feed:

- replicas the operator wants vs replicas ready, per Deployment (the same numbers as `status.desiredReplicas`
  and `status.readyReplicas`), so a dashboard shows a deployment waking from zero or stuck on a GPU stockout;
- adapter loads and load failures, per LoraAddon and the Deployment it is loaded on (the serverless pool's
  name for pool-seated addons), failures by the reason the addon's status reports.

Label values are only names of objects that exist (and the bounded set of refusal reasons), never request data.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge

DEPLOYMENT_LABELS = ["namespace", "deployment"]
ADDON_LABELS = [*DEPLOYMENT_LABELS, "addon"]

REPLICAS_DESIRED = Gauge(
    "loraserve_deployment_replicas_desired",
    "Replicas the operator asks of a Deployment's model server (status.desiredReplicas).",
    DEPLOYMENT_LABELS,
)
REPLICAS_READY = Gauge(
    "loraserve_deployment_replicas_ready",
    "Ready replicas of a Deployment's model server (status.readyReplicas).",
    DEPLOYMENT_LABELS,
)
ADAPTER_LOADS = Counter(
    "loraserve_adapter_loads_total",
    "Adapter versions of a LoraAddon loaded into a replica (fetched, digest checked, loaded by vLLM).",
    ADDON_LABELS,
)
ADAPTER_LOAD_FAILURES = Counter(
    "loraserve_adapter_load_failures_total",
    "Attempts to load an adapter version into a replica that failed, by reason (AdapterLoadFailed, ...).",
    [*ADDON_LABELS, "reason"],
)

METRIC_NAMES = (
    "loraserve_deployment_replicas_desired",
    "loraserve_deployment_replicas_ready",
    "loraserve_adapter_loads_total",
    "loraserve_adapter_load_failures_total",
)


def record_replicas(namespace: str, deployment: str, desired: int, ready: int) -> None:
    REPLICAS_DESIRED.labels(namespace, deployment).set(desired)
    REPLICAS_READY.labels(namespace, deployment).set(ready)


def record_adapter_load(namespace: str, deployment: str, addon: str) -> None:
    ADAPTER_LOADS.labels(namespace, deployment, addon).inc()


def record_adapter_load_failure(namespace: str, deployment: str, addon: str, reason: str) -> None:
    ADAPTER_LOAD_FAILURES.labels(namespace, deployment, addon, reason).inc()


def forget_deployment(namespace: str, deployment: str) -> None:
    """Drop a deleted Deployment's gauges, so a dashboard does not show its last values for ever."""
    for gauge in (REPLICAS_DESIRED, REPLICAS_READY):
        with contextlib.suppress(KeyError):  # never recorded (e.g. refused at its first reconcile)
            gauge.remove(namespace, deployment)
