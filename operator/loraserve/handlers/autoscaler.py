"""The autoscaler of each Deployment, beside its reconcile loop in its Kopf daemon. Each look (every tick while
the Deployment is busy; when idle, only when woken by traffic, a spec or replica change, or at its next
deadline) reads the routers' and the replicas' metrics, feeds the pure policy (loraserve.autoscale.policy),
writes the decision through the scale subresource, meters GPU-seconds, persists the idle clock in status, and
deletes a Deployment idle past its GC age (with an Event first)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
import kubernetes
from prometheus_client import Counter
from pydantic import ValidationError

from loraserve.api.common import GROUP, VERSION
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.naming import KEEP_ANNOTATION, MODEL_SERVER_PORT
from loraserve.autoscale.policy import GpuMeter, ScalingPolicy, ScalingSettings, idle_gc_at, next_look
from loraserve.autoscale.signals import RouterSignal
from loraserve.durations import parse_window
from loraserve.handlers.deployment import COMPANIONS, POD_LISTENERS, kube, observed_pods
from loraserve.handlers.follow import Looks, spread
from loraserve.handlers.load import (
    SCRAPE_LISTENERS,
    latest_signals,
    ready_replicas,
    router_signals,
    routers_answered,
    scrape_routers,
)
from loraserve.handlers.metrics import forget_deployment
from loraserve.resources.model_server import desired_replicas
from loraserve.settings import operator_settings
from loraserve.status import gpu_stockout
from loraserve.vllm.admin import VllmAdmin, VllmError

GPU_SECONDS = Counter(
    "loraserve_gpu_seconds_total", "Ready replicas x accelerators x seconds", ["namespace", "deployment", "accelerator"]
)
SCALE_DECISIONS = Counter("loraserve_scale_decisions_total", "Replica changes", ["namespace", "deployment", "reason"])
# An idle Deployment's autoscaler looks at least this often (it is woken by events; this is a safety net).
RESYNC_SECONDS = 300.0
COALESCE_SECONDS = 0.2
RETRY_SECONDS = 5.0  # after a look that failed
# While requests keep coming, status.lastRequestTime is written at most this often (it moves every second; at
# every tick that was a status write every 2 s for each busy Deployment, 500 a second for 1,000 of them).
REQUEST_TIME_EVERY = 60.0
STOP_GRACE = 8.0  # the daemon stopping: the look under way ends, or is cancelled (before Kopf's 10 s)


async def _replica_load(session: aiohttp.ClientSession, ips: list[str]) -> float | None:
    """Requests running and waiting on the ready replicas; None when one of them did not answer (a busy CPU
    replica can miss the timeout: that is not a load of zero), or when none is ready: a replica can leave ready
    under load (a missed readiness probe), and read as 0 while the routers' scrape also went unanswered, that
    would reset the up-window of a Deployment under load. The routers' count alone is the load then."""
    if not ips:
        return None

    async def one(ip: str) -> float | None:
        try:
            metrics = await VllmAdmin(f"http://{ip}:{MODEL_SERVER_PORT}", session, timeout=2).metrics()
        except VllmError:
            return None
        return float(metrics.requests_running + metrics.requests_waiting)

    loads = await asyncio.gather(*(one(ip) for ip in ips))
    return None if None in loads else sum(load for load in loads if load is not None)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str | None) -> float | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    kube().patch_custom_status("deployments", name, namespace, {"status": status})


def _scale(namespace: str, name: str, replicas: int) -> None:
    kube().scale_custom("deployments", name, namespace, replicas)


class Scaled:
    """One Deployment's autoscaler: its state between looks (the policy's windows, the GPU meter, what it last
    wrote) and its looks. It follows the Deployment beside its reconcile loop, in the same Kopf daemon."""

    def __init__(self, body: kopf.Body, name: str, namespace: str, logger: kopf.Logger) -> None:
        self.body, self.name, self.namespace, self.logger = body, name, namespace, logger
        self.looks = Looks(self.look, COALESCE_SECONDS, RETRY_SECONDS)
        self.requests_total: float | None = None  # the routers' counter at the last look
        self.seen: Any = None  # (generation, keep annotation) at the last event
        self.created = _epoch(body.metadata.get("creationTimestamp")) or time.time()
        status = dict(body.status or {})
        # The idle clock survives operator restarts: it is read back from status (by the first look, which
        # has a valid spec for the policy).
        self.restored_request_at = _epoch(status.get("lastRequestTime"))
        self.policy: ScalingPolicy | None = None
        self.meter = GpuMeter(total=float(status.get("gpuSeconds") or 0.0))
        # What the operator last asked for: a higher spec.replicas than this was set from outside (a wake-up).
        self.last_applied = int(status.get("desiredReplicas") or 0)
        self.last_written = 0.0
        self.request_time_written = 0.0  # when status.lastRequestTime was last written
        self.meter_every: float | None = None  # gpu_meter_every, spread (drawn again after each write)
        self.written: dict[str, Any] = {}

    async def look(self, _: bool) -> float | None:
        body, name, namespace, logger = self.body, self.name, self.namespace, self.logger
        settings = operator_settings().autoscaler
        now = time.time()
        if self.meter_every is None:
            self.meter_every = spread(settings.gpu_meter_every)
        try:
            spec = DeploymentSpec.model_validate(dict(body.spec))
        except ValidationError:
            return RESYNC_SECONDS  # the Deployment's loop reports it (Stalled: InvalidSpec); a new spec wakes this
        if spec.replicas is None:
            # The Deployment's loop sets it on its first reconcile; that write is a new generation, which wakes
            # this loop (deployment_respecified). Polling for it every tick was, at 1,000 Deployments created at
            # once, a sixth of the operator's event loop.
            return RESYNC_SECONDS
        if self.policy is None:
            self.policy = ScalingPolicy.restore(
                ScalingSettings.from_spec(spec),
                {"createdAt": self.created, "lastRequestTime": self.restored_request_at},
            )
        policy, meter = self.policy, self.meter
        policy.update_settings(ScalingSettings.from_spec(spec))
        current = desired_replicas(spec)
        if current > self.last_applied:
            policy.record_request(now)  # woken from outside (the router at zero, or kubectl scale)
        session = _session()
        signal = (await router_signals(session, settings)).get((namespace, name), RouterSignal())
        pods = await observed_pods(namespace, name)  # kept current by watch events
        ips = [ip for _, ip in ready_replicas(pods)]
        replica_load = await _replica_load(session, ips)
        known = [x for x in (signal.in_flight if routers_answered() else None, replica_load) if x is not None]
        if not known:
            # Neither the routers nor the replicas answered: no sample, rather than a load of zero that would
            # reset the up-window or start the down-window. Asked again next tick; with no replica ready, when one
            # becomes ready or the routers see traffic for it (both wake this), not every tick while the routers
            # are unreachable.
            logger.debug(f"{namespace}/{name}: load not known (no answer from the routers or the replicas)")
            return settings.tick if ips else RESYNC_SECONDS
        load = max(known)
        previous_total, self.requests_total = self.requests_total, signal.requests_total
        arrived = 0 if previous_total is None else int(signal.requests_total - previous_total)
        policy.observe(now, load, arrived, last_request_at=signal.last_request)
        unschedulable = 1 if gpu_stockout(pods) else 0
        schedulable = max(0, len([p for p in pods if not p["metadata"].get("deletionTimestamp")]) - unschedulable)
        decision = policy.desired(now, current, schedulable if unschedulable else None)
        logger.debug(f"{namespace}/{name}: load {load:g} (router {signal.in_flight:g}), {current} -> {decision}")
        new_status: dict[str, Any] = {}
        scaling = decision.replicas != current
        if scaling:
            await asyncio.to_thread(_scale, namespace, name, decision.replicas)
            SCALE_DECISIONS.labels(namespace, name, decision.reason.value).inc()
            message = f"{current} -> {decision.replicas} replicas: {decision.reason.value} (load {load:g})"
            kopf.info(body, reason="Scaled", message=message)
            logger.info(message, extra={"k8s_skip": True})  # logged; posted once, as the Event above
            new_status.update(
                lastScaleTime=_iso(now), scaleReason=f"{decision.reason.value}: {decision.message}".rstrip(": ")
            )
            current = decision.replicas
        self.last_applied = current
        added = meter.sample(now, len(ips), spec.effective_accelerator_count)
        if added:
            GPU_SECONDS.labels(namespace, name, spec.accelerator_type.value).inc(added)
        busy = load > 0 or signal.held > 0 or arrived > 0 or scaling
        if policy.last_request_time is not None and (
            not busy or new_status or now - self.request_time_written >= REQUEST_TIME_EVERY
        ):
            # Rounded up to the second status keeps: a successor's zero clock is never earlier. Under traffic it
            # moves every second: written once traffic stops (the time a successor's zero clock counts from),
            # with another change, and at least every REQUEST_TIME_EVERY, not at every tick.
            new_status["lastRequestTime"] = _iso(math.ceil(policy.last_request_time))
        changed = {k: v for k, v in new_status.items() if self.written.get(k) != v}
        # The meter alone moves on every look: it rides along with another change, or about every
        # gpu_meter_every, spread so that Deployments that became ready together do not write together.
        if changed or now - self.last_written >= self.meter_every:
            if self.written.get("gpuSeconds") != (gpu := round(meter.total, 1)):
                changed["gpuSeconds"] = gpu
            if changed:
                await asyncio.to_thread(_patch_status, namespace, name, changed)
                self.written.update(changed)
                if "lastRequestTime" in changed:
                    self.request_time_written = now
            self.last_written = now
            self.meter_every = spread(settings.gpu_meter_every)
        gc_age = parse_window(spec.idle_delete_after) if spec.idle_delete_after else settings.idle_delete_after
        keep = (body.metadata.annotations or {}).get(KEEP_ANNOTATION) == "true"
        gc_at = idle_gc_at(policy.last_request_time, self.created, spec.min_replicas, keep, gc_age)
        if gc_at is not None and now >= gc_at:
            idle_for = now - (policy.last_request_time or self.created)
            kopf.warn(
                body, reason="IdleDeleted", message=f"no request for {idle_for:.0f}s (limit {gc_age:.0f}s): deleting"
            )
            await asyncio.sleep(1.0)  # let the Event land before the object goes
            await asyncio.to_thread(kube().delete_custom, "deployments", name, namespace)
            return None
        meter_due = self.last_written + self.meter_every if ips else None
        resync = max(RESYNC_SECONDS, self.meter_every)  # a meter period past the resync is one look, not two
        return next_look(now, settings.tick, busy, (policy.next_change(now, current), gc_at, meter_due), resync)

    async def stopped(self) -> None:
        """Its Deployment's daemon ended (the looks have): nothing of it stays, and what the meter counted since
        its last write is kept (shutdown, a peer takes over)."""
        key = (self.namespace, self.name)
        if _scaled.get(key) is self:
            del _scaled[key]
        forget_deployment(self.namespace, self.name)  # a deleted Deployment leaves no stale gauges
        self.meter.sample(time.time(), 0, 0)  # charges the time since the last look at that look's count
        gpu = round(self.meter.total, 1)
        if not self.body.metadata.get("deletionTimestamp") and self.written.get("gpuSeconds") != gpu:
            with contextlib.suppress(kubernetes.client.ApiException):
                await asyncio.to_thread(_patch_status, self.namespace, self.name, {"gpuSeconds": gpu})


def _start(body: kopf.Body, name: str, namespace: str, logger: kopf.Logger) -> Scaled:
    scaled = _scaled[(namespace, name)] = Scaled(body, name, namespace, logger)
    return scaled


COMPANIONS.append(_start)


# (namespace, name) -> its autoscaler; registered when its Deployment's daemon starts, removed when it ends.
_scaled: dict[tuple[str, str], Scaled] = {}


def _wake_on_traffic() -> None:
    """After each scrape of the routers: a Deployment with requests in flight or held, or new requests since
    its last look, looks now (an idle one is otherwise looked at only at its own deadlines)."""
    for key, signal in latest_signals().items():
        scaled = _scaled.get(key)
        if scaled is not None and (
            signal.in_flight > 0 or signal.held > 0 or signal.requests_total != scaled.requests_total
        ):
            scaled.looks.wake()


def _wake_on_replicas(namespace: str, name: str) -> None:
    """A replica became ready, left or restarted: the GPU meter and the schedulable count move."""
    scaled = _scaled.get((namespace, name))
    if scaled is not None:
        scaled.looks.wake()


SCRAPE_LISTENERS.append(_wake_on_traffic)
POD_LISTENERS.append(_wake_on_replicas)


@kopf.on.event(GROUP, VERSION, "deployments")
async def deployment_respecified(
    event: kopf.RawEvent, name: str | None, namespace: str | None, body: kopf.Body, **_: Any
) -> None:
    """A new generation (windows, min/max, or spec.replicas set from outside: the router waking it from zero,
    kubectl scale) or the keep annotation: its autoscaler looks again."""
    scaled = _scaled.get((namespace or "", name or ""))
    if scaled is None or event.get("type") == "DELETED":
        return
    seen = (body.metadata.get("generation"), (body.metadata.annotations or {}).get(KEEP_ANNOTATION))
    if seen != scaled.seen:
        scaled.seen = seen
        scaled.looks.wake()


_scraping: asyncio.Task[None] | None = None
# One HTTP client for every Deployment's looks (the routers' and the replicas' metrics): one each was a
# connection pool per Deployment.
_sessions: list[aiohttp.ClientSession] = []


def _session() -> aiohttp.ClientSession:
    if not _sessions:
        _sessions.append(aiohttp.ClientSession())
    return _sessions[0]


@kopf.on.startup()
async def start_scraping_routers(**_: Any) -> None:
    global _scraping
    _scraping = asyncio.create_task(scrape_routers(operator_settings().autoscaler))


@kopf.on.cleanup()
async def stop_scraping_routers(**_: Any) -> None:
    if _scraping is not None:
        _scraping.cancel()
    while _sessions:
        await _sessions.pop().close()
