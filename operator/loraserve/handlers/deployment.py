"""Deployment CR -> apps/v1 Deployment + Service of vLLM pods, and honest status."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf
import kubernetes
from pydantic import ValidationError

from loraserve.api.common import GROUP, VERSION
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.api.naming import LABEL_DEPLOYMENT, LABEL_NAME, child_name, selector_labels
from loraserve.handlers.cache import ClusterCache, slim
from loraserve.handlers.follow import Looks, follow, resync_seconds
from loraserve.handlers.metrics import record_replicas
from loraserve.handlers.threads import Threads
from loraserve.kube import SERVICE_CALLS_IN_FLIGHT, Kube, api_error_text
from loraserve.resources.model_server import (
    build_deployment,
    build_network_policy,
    build_service,
    build_token_secret,
    desired_replicas,
)
from loraserve.settings import operator_settings
from loraserve.status import (
    Observed,
    Status,
    caught_up,
    compute_status,
    kstatus_conditions,
    merge_conditions,
    since_written,
    status_patch,
)
from loraserve.tokens import ModelServerTokens

# A Deployment is reconciled when it, its child apps/v1 Deployment, its pods or its ModelVersion change, else
# at its slow resync (follow.resync_seconds).
# Child events come in bursts (a pod: scheduled, started, ready): one reconcile serves the whole burst.
COALESCE_SECONDS = 0.2
RETRY_SECONDS = 5.0  # after a failed reconcile
STOP_GRACE = 8.0  # the daemon stopping: the reconcile under way ends, or is cancelled (before Kopf's 10 s)
MODEL_SERVER = {LABEL_NAME: "loraserve-model-server"}
_kube: Kube | None = None
CACHE = ClusterCache()


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


@functools.cache
def model_server_tokens() -> ModelServerTokens:
    """The install key (a file the chart mounts), read once; the operator's startup calls this first."""
    return ModelServerTokens.from_file(operator_settings().model_server_key_file)


def _stalled(patch: kopf.Patch, previous: dict[str, Any], generation: int, reason: str, message: str) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch.status["observedGeneration"] = generation
    patch.status["state"] = "FAILED"
    patch.status["message"] = f"{reason}: {message}"
    conditions = kstatus_conditions(False, False, True, reason, message, generation, now)
    patch.status["conditions"] = merge_conditions(previous.get("conditions") or [], conditions)


async def observed_pods(namespace: str, name: str, refresh: bool = False) -> list[dict[str, Any]]:
    """The model-server pods of Deployment CR `name`: from the watch-fed cache, listed when never seen (or
    on `refresh`)."""
    key = (namespace, name)
    pods = None if refresh else CACHE.pod_list(key)
    if pods is None:
        listed, version = await asyncio.to_thread(kube().list_pods_versioned, namespace, selector_labels(name))
        CACHE.fill_pods(key, listed, version)
        pods = CACHE.pod_list(key) or []
    return pods


async def observed_child(namespace: str, name: str, refresh: bool = False) -> dict[str, Any] | None:
    key = (namespace, name)
    if refresh or key not in CACHE.children:
        CACHE.fill_child(key, await asyncio.to_thread(kube().get_deployment_child, child_name(name), namespace))
    return CACHE.children.get(key)


async def observed_version(namespace: str, name: str, refresh: bool = False) -> dict[str, Any] | None:
    key = (namespace, name)
    if refresh or key not in CACHE.versions:
        CACHE.fill_version(key, await asyncio.to_thread(kube().get_custom, "modelversions", name, namespace))
    return CACHE.versions.get(key)


async def reconcile(
    body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, refresh: bool = True, written: Status | None = None
) -> None:
    """Apply the children and compute status. `refresh` reads the cluster afresh (a spec change, the start,
    the slow resync); without it, what the watch events brought is enough (a child or pod changed). `written`:
    the status this operator last wrote, newer than the body's until the watch brings the write back."""
    name, namespace = body.metadata.name, body.metadata.namespace
    assert name is not None
    assert namespace is not None
    uid = body.metadata.uid or ""
    generation = int(body.metadata.get("generation") or 0)
    previous = since_written(body, written)
    try:
        spec = DeploymentSpec.model_validate(dict(body.spec))
    except ValidationError as exc:  # admission should have refused it; say so instead of crashing
        _stalled(patch, previous, generation, "InvalidSpec", str(exc).replace("\n", " "))
        return
    merge_source: ModelVersionSpec | None = None
    if spec.model_version is not None:
        version = await observed_version(namespace, spec.model_version, refresh)
        if version is None:
            message = f"ModelVersion {spec.model_version!r} not found in namespace {namespace}"
            if previous.get("message") != f"ModelVersionNotFound: {message}":
                kopf.warn(body, reason="ModelVersionNotFound", message=message)
            _stalled(patch, previous, generation, "ModelVersionNotFound", message)
            return
        merge_source = ModelVersionSpec.model_validate(version["spec"])
    desired = desired_replicas(spec)
    if spec.replicas is None:
        # The scale subresource (router wake-ups, the autoscaler, `kubectl scale`) needs the field to exist.
        patch.spec["replicas"] = desired
    child = await observed_child(namespace, name, refresh)
    pods = await observed_pods(namespace, name, refresh)
    await asyncio.to_thread(_apply_children, name, namespace, uid, spec, merge_source, child, logger)
    if refresh:  # the Service is not watched: checked when the cluster is read afresh
        await SERVICE_THREADS.call(_apply_service, name, namespace, uid, spec, logger)
    status = compute_status(spec, generation, desired, Observed(child=child, pods=pods), previous, datetime.now(UTC))
    record_replicas(namespace, name, int(status.get("desiredReplicas") or 0), int(status.get("readyReplicas") or 0))
    status["selector"] = ",".join(f"{k}={v}" for k, v in selector_labels(name).items())
    status["endpoint"] = f"http://{child_name(name)}.{namespace}.svc:8000"
    _report_transition(body, previous, status)
    for key, value in status_patch(previous, status).items():
        patch.status[key] = value


def _apply_children(
    name: str,
    namespace: str,
    uid: str,
    spec: DeploymentSpec,
    merge_source: ModelVersionSpec | None,
    child: dict[str, Any] | None,
    logger: kopf.Logger,
) -> None:
    settings = operator_settings().manifests
    token = model_server_tokens().token(namespace, name)
    if token is not None and kube().apply_secret(build_token_secret(name, namespace, uid, token)):
        logger.info(f"applied the model-server token Secret of {name}")
    policy = build_network_policy(name, namespace, uid, settings)
    if policy is not None and kube().apply_network_policy(policy):
        logger.info(f"applied NetworkPolicy {policy['metadata']['name']}")
    manifest = build_deployment(name, namespace, uid, spec, settings, merge_source)
    if kube().apply_deployment_child(manifest, child):
        logger.info(f"applied apps/v1 Deployment {child_name(name)} (replicas {manifest['spec']['replicas']})")


# A Service's create is the API server's slowest write here: with 300 Deployments created at once, about 4 a
# second however many ask at once (8.7 s each, 32 at a time, on the threads every other call of the Deployments
# then queued behind for 10 s). On threads of their own, Services wait for each other only.
SERVICE_THREADS = Threads(SERVICE_CALLS_IN_FLIGHT, "kube-services")


def _apply_service(name: str, namespace: str, uid: str, spec: DeploymentSpec, logger: kopf.Logger) -> None:
    if kube().apply_service(build_service(name, namespace, uid, spec, operator_settings().manifests)):
        logger.info(f"applied Service {child_name(name)}")


def _report_transition(body: kopf.Body, previous: dict[str, Any], status: dict[str, Any]) -> None:
    """An Event when the state changes: what a person watching `kubectl describe` must know."""
    if (
        previous.get("state") == status["state"]
        and previous.get("message", "").split(":")[0] == status["message"].split(":")[0]
    ):
        return
    if status["state"] == "FAILED" or any(
        c["type"] == "Stalled" and c["status"] == "True" for c in status["conditions"]
    ):
        reason = next(c["reason"] for c in status["conditions"] if c["type"] == "Stalled")
        kopf.warn(body, reason=reason, message=status["message"])
    elif previous.get("state") != status["state"]:
        kopf.info(body, reason=status["state"].title().replace("_", ""), message=status["message"])


def _written(memo: kopf.Memo) -> Status:
    """The status fields this operator last wrote for the object, until its watch event shows them (its Kopf
    memo: freed with the object)."""
    written: Status = memo.setdefault("written", {})
    return written


class Watched:
    """A Deployment CR the operator follows: its live body and what wakes its reconcile loop."""

    def __init__(self, body: kopf.Body, look: Callable[[bool], Awaitable[float | None]]) -> None:
        self.body = body
        self.looks = Looks(look, COALESCE_SECONDS, RETRY_SECONDS)
        self.refresh = True  # the next reconcile reads the cluster afresh
        self.generation = body.metadata.get("generation")
        # The generation this operator's own spec write (spec.replicas) made: its event needs a reconcile (for
        # status.observedGeneration) but nothing read afresh, since only that field changed.
        self.own_generation: int | None = None


class Companion(Protocol):
    """What else follows a Deployment for its daemon's life (the autoscaler): its looks run beside the
    reconcile loop's, and `stopped` is called once they have ended."""

    looks: Looks

    async def stopped(self) -> None: ...


# Started with each Deployment's loop, in its one Kopf daemon (a daemon each was a task, a cause and a stopper
# more per Deployment).
COMPANIONS: list[Callable[[kopf.Body, str, str, kopf.Logger], Companion]] = []

# (namespace, name) -> the CR's loop, registered by its daemon and removed when the daemon ends (the object is
# deleted, or this operator pauses for a peer), so nothing outlives the object.
_watched: dict[tuple[str, str], Watched] = {}


@kopf.daemon(GROUP, VERSION, "deployments", cancellation_timeout=10)  # type: ignore[arg-type]
async def deployment_follow(
    body: kopf.Body,
    name: str,
    namespace: str,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Status follows the children (pods becoming ready or unschedulable, stockouts clearing) as they change,
    instead of polling every object on a short timer."""

    async def look(woken: bool) -> float | None:
        if body.metadata.get("deletionTimestamp"):
            return None
        if not woken:
            watched.refresh = True  # the slow resync reads the cluster afresh
        refresh, watched.refresh = watched.refresh, False
        try:
            await _reconcile_and_write(body, name, namespace, logger, refresh, memo)
        except Exception as exc:
            watched.refresh = True  # the retry reads the cluster afresh
            if not isinstance(exc, kubernetes.client.ApiException):
                raise  # logged by Looks, retried after RETRY_SECONDS
            if exc.status == 404:
                return None  # deleted meanwhile
            logger.warning(f"reconcile of {name} failed, retrying: {api_error_text(exc)}")
            return RETRY_SECONDS
        if not woken:
            for listener in RESYNC_LISTENERS:
                listener(namespace, name)
        return resync_seconds()

    watched = _watched[(namespace, name)] = Watched(body, look)
    companions = []
    for start in COMPANIONS:
        try:
            companions.append(start(body, name, namespace, logger))
        except Exception as exc:  # e.g. a status field it reads back, edited by hand: the loop goes on without it
            logger.error(f"{start.__module__} does not follow {name}: {exc!r}")
    for listener in FOLLOW_LISTENERS:
        listener(namespace, name)
    try:
        # child events may have come before this loop was registered: it looks at once
        await follow(stopped, [watched.looks, *(c.looks for c in companions)], STOP_GRACE)
    finally:
        if _watched.get((namespace, name)) is watched:
            del _watched[(namespace, name)]
            CACHE.forget((namespace, name))
        await asyncio.gather(*(c.stopped() for c in companions))


async def _reconcile_and_write(
    body: kopf.Body, name: str, namespace: str, logger: kopf.Logger, refresh: bool, memo: kopf.Memo
) -> None:
    patch = kopf.Patch()
    await reconcile(body, patch, logger, refresh, memo.get("written"))
    watched = _watched.get((namespace, name))
    # Once: until the watch brings the write back (the body reaches the generation it made), every look would
    # write spec.replicas again, each a new generation.
    pending = watched is not None and int(body.metadata.get("generation") or 0) < (watched.own_generation or 0)
    if patch.spec and not pending:
        generation = await asyncio.to_thread(
            kube().patch_custom, "deployments", name, namespace, {"spec": dict(patch.spec)}
        )
        if watched is not None:
            watched.own_generation = generation
    if patch.status:
        await asyncio.to_thread(
            kube().patch_custom_status, "deployments", name, namespace, {"status": dict(patch.status)}
        )
        _written(memo).update(patch.status)  # read again: the event showing the last write dropped it


def wake(namespace: str | None, name: str | None) -> None:
    watched = _watched.get((namespace or "", name or ""))
    if watched is not None:
        watched.looks.wake()


@kopf.on.event(GROUP, VERSION, "deployments")
async def deployment_spec_changed(
    event: kopf.RawEvent, name: str | None, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    """A new generation (the spec changed: a user, `kubectl scale`, the autoscaler, the router waking it from
    zero): its loop reconciles, reading the cluster afresh. The loop's first look is the create's (or, after a
    restart, the resume's) reconcile: with no create or update handler, Kopf writes no last-handled-configuration
    per Deployment, and a create is reconciled once, not twice."""
    slim(event["object"])  # the loops' live body (Kopf keeps this dict)
    if caught_up(event["object"], memo.get("written")):
        del memo["written"]
    watched = _watched.get((namespace or "", name or ""))
    if watched is None or event.get("type") == "DELETED":
        return
    generation = body.metadata.get("generation")
    if generation != watched.generation:
        watched.generation = generation
        watched.refresh = watched.refresh or generation != watched.own_generation
        watched.looks.wake()


# Who else wants to hear of a replica's readiness change or a ModelVersion change (the addons), of a
# Deployment's loop starting (its addons wait for it) ...
POD_LISTENERS: list[Callable[[str, str], None]] = []
VERSION_LISTENERS: list[Callable[[str, str], None]] = []
FOLLOW_LISTENERS: list[Callable[[str, str], None]] = []
# ... and of its slow resync (the addons' adapters are checked then, once per replica for all of them).
RESYNC_LISTENERS: list[Callable[[str, str], None]] = []


@kopf.on.event("apps", "v1", "deployments", labels=MODEL_SERVER)
async def child_changed(event: kopf.RawEvent, meta: kopf.Meta, namespace: str | None, **_: Any) -> None:
    owner = meta.get("labels", {}).get(LABEL_DEPLOYMENT)
    if namespace and owner:
        CACHE.child_event((namespace, owner), event.get("type"), dict(event["object"]))
    wake(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=MODEL_SERVER)
async def pod_changed(event: kopf.RawEvent, meta: kopf.Meta, namespace: str | None, **_: Any) -> None:
    owner = meta.get("labels", {}).get(LABEL_DEPLOYMENT)
    if not namespace or not owner:
        return
    if CACHE.pod_event((namespace, owner), event.get("type"), dict(event["object"])):
        for listener in POD_LISTENERS:
            listener(namespace, owner)
    wake(namespace, owner)


@kopf.on.event(GROUP, VERSION, "modelversions")
async def model_version_changed(event: kopf.RawEvent, name: str | None, namespace: str | None, **_: Any) -> None:
    """A live-merge Deployment waiting for its ModelVersion goes on as soon as the version appears."""
    if not name or not namespace:
        return
    if not CACHE.version_event((namespace, name), event.get("type"), dict(event["object"])):
        return
    for (ns, _dep), watched in list(_watched.items()):
        if ns == namespace and watched.body.spec.get("modelVersion") == name:
            watched.looks.wake()
    for listener in VERSION_LISTENERS:
        listener(namespace, name)


def followed(namespace: str, name: str) -> kopf.Body | None:
    """The Deployment CR's live body, when this operator follows it (no API call)."""
    watched = _watched.get((namespace, name))
    return None if watched is None else watched.body


@kopf.on.cleanup()
async def stop_service_threads(**_: Any) -> None:
    SERVICE_THREADS.shutdown()
