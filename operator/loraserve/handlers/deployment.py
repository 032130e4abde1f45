"""Deployment CR -> apps/v1 Deployment + Service of vLLM pods, and honest status."""

from __future__ import annotations

import asyncio
import functools
import os
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
from pydantic import ValidationError

from loraserve.api.common import GROUP, VERSION
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.api.naming import LABEL_DEPLOYMENT, LABEL_NAME, child_name, selector_labels
from loraserve.handlers.metrics import record_replicas
from loraserve.kube import Kube
from loraserve.resources.model_server import (
    build_deployment,
    build_network_policy,
    build_service,
    build_token_secret,
    desired_replicas,
)
from loraserve.resources.settings import ManifestSettings
from loraserve.status import Observed, compute_status, status_patch
from loraserve.tokens import ModelServerTokens

# A Deployment is reconciled when it, its child apps/v1 Deployment, its pods or its ModelVersion change; this
# slow resync only heals what a lost watch event would leave behind.
RESYNC_SECONDS = 120.0
# Child events come in bursts (a pod: scheduled, started, ready): one reconcile serves the whole burst.
COALESCE_SECONDS = 0.2
MODEL_SERVER = {LABEL_NAME: "loraserve-model-server"}
_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


@functools.cache
def model_server_tokens() -> ModelServerTokens:
    """The install key (a file the chart mounts), read once; the operator's startup calls this first."""
    return ModelServerTokens.from_file(os.environ.get("LORASERVE_MODEL_SERVER_KEY_FILE"))


def _stalled(patch: kopf.Patch, generation: int, reason: str, message: str) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch.status["observedGeneration"] = generation
    patch.status["state"] = "FAILED"
    patch.status["message"] = f"{reason}: {message}"
    patch.status["conditions"] = [
        {"type": "Ready", "status": "False", "reason": reason, "message": message, "lastTransitionTime": now},
        {"type": "Reconciling", "status": "False", "reason": reason, "message": message, "lastTransitionTime": now},
        {"type": "Stalled", "status": "True", "reason": reason, "message": message, "lastTransitionTime": now},
    ]


def reconcile(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger) -> None:
    name, namespace = body.metadata.name, body.metadata.namespace
    assert name is not None
    assert namespace is not None
    uid = body.metadata.uid or ""
    generation = int(body.metadata.get("generation") or 0)
    previous = dict(body.status or {})
    try:
        spec = DeploymentSpec.model_validate(dict(body.spec))
    except ValidationError as exc:  # admission should have refused it; say so instead of crashing
        _stalled(patch, generation, "InvalidSpec", str(exc).replace("\n", " "))
        return
    merge_source: ModelVersionSpec | None = None
    if spec.model_version is not None:
        version = kube().get_custom("modelversions", spec.model_version, namespace)
        if version is None:
            message = f"ModelVersion {spec.model_version!r} not found in namespace {namespace}"
            if previous.get("message") != f"ModelVersionNotFound: {message}":
                kopf.warn(body, reason="ModelVersionNotFound", message=message)
            _stalled(patch, generation, "ModelVersionNotFound", message)
            return
        merge_source = ModelVersionSpec.model_validate(version["spec"])
    settings = ManifestSettings.from_env()
    desired = desired_replicas(spec)
    if spec.replicas is None:
        # The scale subresource (router wake-ups, the autoscaler, `kubectl scale`) needs the field to exist.
        patch.spec["replicas"] = desired
    token = model_server_tokens().token(namespace, name)
    if token is not None and kube().apply_secret(build_token_secret(name, namespace, uid, token)):
        logger.info(f"applied the model-server token Secret of {name}")
    policy = build_network_policy(name, namespace, uid, settings)
    if policy is not None and kube().apply_network_policy(policy):
        logger.info(f"applied NetworkPolicy {policy['metadata']['name']}")
    if kube().apply_deployment_child(build_deployment(name, namespace, uid, spec, settings, merge_source)):
        logger.info(f"applied apps/v1 Deployment {child_name(name)} (replicas {desired})")
    if kube().apply_service(build_service(name, namespace, uid, spec, settings)):
        logger.info(f"applied Service {child_name(name)}")
    observed = Observed(
        child=kube().get_deployment_child(child_name(name), namespace),
        pods=kube().list_pods(namespace, selector_labels(name)),
    )
    status = compute_status(spec, generation, desired, observed, previous, datetime.now(UTC))
    record_replicas(namespace, name, int(status.get("desiredReplicas") or 0), int(status.get("readyReplicas") or 0))
    status["selector"] = ",".join(f"{k}={v}" for k, v in selector_labels(name).items())
    status["endpoint"] = f"http://{child_name(name)}.{namespace}.svc:8000"
    _report_transition(body, previous, status)
    for key, value in status_patch(previous, status).items():
        patch.status[key] = value


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


@kopf.on.resume(GROUP, VERSION, "deployments")
@kopf.on.create(GROUP, VERSION, "deployments")
@kopf.on.update(GROUP, VERSION, "deployments", field="spec")
def deployment_changed(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    reconcile(body, patch, logger)


class Watched:
    """A Deployment CR the operator follows: its live body and what wakes its reconcile loop."""

    def __init__(self, body: kopf.Body) -> None:
        self.body = body
        self.wake = asyncio.Event()


# (namespace, name) -> the CR's loop, registered by its daemon and removed when the daemon ends (the object is
# deleted, or this operator pauses for a peer), so nothing outlives the object.
_watched: dict[tuple[str, str], Watched] = {}


@kopf.daemon(GROUP, VERSION, "deployments", cancellation_timeout=10)  # type: ignore[arg-type]
async def deployment_follow(
    body: kopf.Body, name: str, namespace: str, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any
) -> None:
    """Status follows the children (pods becoming ready or unschedulable, stockouts clearing) as they change,
    instead of polling every object on a short timer."""
    watched = _watched[(namespace, name)] = Watched(body)
    watched.wake.set()  # child events may have come before this loop was registered
    try:
        while not stopped:
            woken = asyncio.ensure_future(watched.wake.wait())
            stopping = asyncio.ensure_future(stopped.wait())
            await asyncio.wait((woken, stopping), timeout=RESYNC_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            stopping.cancel()
            if stopped or body.metadata.get("deletionTimestamp"):
                break
            await stopped.wait(COALESCE_SECONDS)
            watched.wake.clear()
            try:
                await asyncio.to_thread(_reconcile_and_write, body, name, namespace, logger)
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    break  # deleted meanwhile
                logger.warning(f"reconcile of {name} failed ({exc.status} {exc.reason}); retrying")
                watched.wake.set()
                await stopped.wait(5.0)
    finally:
        if _watched.get((namespace, name)) is watched:
            del _watched[(namespace, name)]


def _reconcile_and_write(body: kopf.Body, name: str, namespace: str, logger: kopf.Logger) -> None:
    patch = kopf.Patch()
    reconcile(body, patch, logger)
    if patch.spec:
        kube().patch_custom("deployments", name, namespace, {"spec": dict(patch.spec)})
    if patch.status:
        kube().patch_custom_status("deployments", name, namespace, {"status": dict(patch.status)})


def wake(namespace: str | None, name: str | None) -> None:
    watched = _watched.get((namespace or "", name or ""))
    if watched is not None:
        watched.wake.set()


@kopf.on.event("apps", "v1", "deployments", labels=MODEL_SERVER)
@kopf.on.event("", "v1", "pods", labels=MODEL_SERVER)
async def child_changed(meta: kopf.Meta, namespace: str | None, **_: Any) -> None:
    wake(namespace, meta.get("labels", {}).get(LABEL_DEPLOYMENT))


@kopf.on.event(GROUP, VERSION, "modelversions")
async def model_version_changed(name: str | None, namespace: str | None, **_: Any) -> None:
    """A live-merge Deployment waiting for its ModelVersion goes on as soon as the version appears."""
    for (ns, _dep), watched in list(_watched.items()):
        if ns == namespace and watched.body.spec.get("modelVersion") == name:
            watched.wake.set()
