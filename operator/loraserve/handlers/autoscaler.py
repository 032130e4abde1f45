"""The autoscaler loop: one Kopf daemon per Deployment. Each tick it reads the router's and the replicas'
metrics, feeds the pure policy (loraserve.autoscale.policy), writes the decision through the scale
subresource, meters GPU-seconds, persists the idle clock in status, and deletes a Deployment idle past its
GC age (with an Event first)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
from prometheus_client import Counter

from loraserve.api.common import GROUP, VERSION
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.naming import KEEP_ANNOTATION, MODEL_SERVER_PORT
from loraserve.autoscale.policy import GpuMeter, ScalingPolicy, ScalingSettings, idle_gc_due
from loraserve.autoscale.signals import RouterSignal
from loraserve.durations import parse_window
from loraserve.handlers.deployment import kube, observed_child, observed_pods
from loraserve.handlers.load import ready_replicas, router_signals
from loraserve.handlers.metrics import forget_deployment
from loraserve.resources.model_server import desired_replicas
from loraserve.settings import operator_settings
from loraserve.status import gpu_stockout
from loraserve.vllm.admin import VllmAdmin, VllmError

GPU_SECONDS = Counter(
    "loraserve_gpu_seconds_total", "Ready replicas x accelerators x seconds", ["namespace", "deployment", "accelerator"]
)
SCALE_DECISIONS = Counter("loraserve_scale_decisions_total", "Replica changes", ["namespace", "deployment", "reason"])
# Seconds between status writes when only the GPU meter moved: the live figure is the metric
# loraserve_gpu_seconds_total; status is a summary, and a write per Deployment every few seconds would be
# most of the API server's load at a thousand Deployments.
STATUS_EVERY = 60.0


async def _replica_load(session: aiohttp.ClientSession, ips: list[str]) -> float:
    async def one(ip: str) -> float:
        try:
            metrics = await VllmAdmin(f"http://{ip}:{MODEL_SERVER_PORT}", session, timeout=2).metrics()
        except VllmError:
            return 0.0
        return float(metrics.requests_running + metrics.requests_waiting)

    return sum(await asyncio.gather(*(one(ip) for ip in ips)))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str | None) -> float | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    kube().custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "deployments", name, {"status": status}
    )


def _scale(namespace: str, name: str, replicas: int) -> None:
    kube().custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, "deployments", name, {"spec": {"replicas": replicas}}
    )


@kopf.daemon(GROUP, VERSION, "deployments", cancellation_timeout=10.0)  # type: ignore[arg-type]
async def deployment_autoscaler(
    body: kopf.Body, name: str, namespace: str, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    settings = operator_settings().autoscaler
    created = _epoch(body.metadata.get("creationTimestamp")) or time.time()
    status = dict(body.status or {})
    spec = DeploymentSpec.model_validate(dict(body.spec))
    # The idle clock survives operator restarts: it is read back from status.
    policy = ScalingPolicy.restore(
        ScalingSettings.from_spec(spec),
        {"createdAt": created, "lastRequestTime": _epoch(status.get("lastRequestTime"))},
    )
    meter = GpuMeter(total=float(status.get("gpuSeconds") or 0.0))
    last_total: float | None = None
    # What the operator last asked for: a higher spec.replicas than this was set from outside (a wake-up).
    last_applied: int = int(status.get("desiredReplicas") or 0)
    last_written = 0.0
    written: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            while not stopped:
                now = time.time()
                spec = DeploymentSpec.model_validate(dict(body.spec))
                if spec.replicas is None:  # the deployment handler sets it on first reconcile
                    await stopped.wait(settings.tick)
                    continue
                policy.update_settings(ScalingSettings.from_spec(spec))
                current = desired_replicas(spec)
                if current > last_applied:
                    policy.record_request(now)  # woken from outside (the router at zero, or kubectl scale)
                signal = (await router_signals(session, settings)).get((namespace, name), RouterSignal())
                pods = await observed_pods(namespace, name)  # kept current by watch events
                ips = [ip for _, ip in ready_replicas(pods)]
                load = max(signal.in_flight, await _replica_load(session, ips))
                arrived = 0 if last_total is None else int(signal.requests_total - last_total)
                last_total = signal.requests_total
                policy.observe(now, load, arrived, last_request_at=signal.last_request)
                unschedulable = 1 if gpu_stockout(pods) else 0
                schedulable = max(
                    0, len([p for p in pods if not p["metadata"].get("deletionTimestamp")]) - unschedulable
                )
                decision = policy.desired(now, current, schedulable if unschedulable else None)
                logger.debug(f"load {load:g} (router {signal.in_flight:g}), {current} replicas -> {decision}")
                new_status: dict[str, Any] = {}
                if decision.replicas != current:
                    await asyncio.to_thread(_scale, namespace, name, decision.replicas)
                    SCALE_DECISIONS.labels(namespace, name, decision.reason.value).inc()
                    message = f"{current} -> {decision.replicas} replicas: {decision.reason.value} (load {load:g})"
                    kopf.info(body, reason="Scaled", message=message)
                    logger.info(message)
                    new_status.update(
                        lastScaleTime=_iso(now), scaleReason=f"{decision.reason.value}: {decision.message}".rstrip(": ")
                    )
                    current = decision.replicas
                last_applied = current
                child = await observed_child(namespace, name)
                ready = int(((child or {}).get("status") or {}).get("readyReplicas") or 0)
                added = meter.sample(now, ready, spec.effective_accelerator_count)
                if added:
                    GPU_SECONDS.labels(namespace, name, spec.accelerator_type.value).inc(added)
                if policy.last_request_time is not None:
                    new_status["lastRequestTime"] = _iso(policy.last_request_time)
                if new_status or now - last_written >= STATUS_EVERY:
                    new_status["gpuSeconds"] = round(meter.total, 1)
                    changed = {k: v for k, v in new_status.items() if written.get(k) != v}
                    if changed:
                        await asyncio.to_thread(_patch_status, namespace, name, changed)
                        written.update(changed)
                    last_written = now
                gc_age = parse_window(spec.idle_delete_after) if spec.idle_delete_after else settings.idle_delete_after
                keep = (body.metadata.annotations or {}).get(KEEP_ANNOTATION) == "true"
                if idle_gc_due(now, policy.last_request_time, created, spec.min_replicas, keep, gc_age):
                    idle_for = now - (policy.last_request_time or created)
                    kopf.warn(
                        body,
                        reason="IdleDeleted",
                        message=f"no request for {idle_for:.0f}s (limit {gc_age:.0f}s): deleting",
                    )
                    await asyncio.sleep(1.0)  # let the Event land before the object goes
                    await asyncio.to_thread(
                        kube().custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, "deployments", name
                    )
                    return
                await stopped.wait(settings.tick)

    finally:
        forget_deployment(namespace, name)  # a deleted Deployment leaves no stale gauges
