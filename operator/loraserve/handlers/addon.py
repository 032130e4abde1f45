"""LoraAddon -> its adapters loaded on every ready replica of its Deployment (and unloaded when gone)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import kopf
from kubernetes.client import ApiException
from pydantic import ValidationError

from loraserve import addons, rollback
from loraserve.api.addon import REARM_ANNOTATION, LoraAddonSpec
from loraserve.api.common import GROUP, VERSION
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.api.naming import MODEL_SERVER_PORT, POOL_LABEL, addon_deployment, selector_labels
from loraserve.durations import parse_window
from loraserve.handlers.deployment import kube, model_server_tokens
from loraserve.handlers.load import (
    AutoscalerSettings,
    ready_replicas,
    router_addon_signals,
    router_signals,
    router_version_counters,
)
from loraserve.handlers.metrics import record_adapter_load, record_adapter_load_failure
from loraserve.resources.settings import ManifestSettings
from loraserve.vllm.admin import AdapterLoadError, VllmAdmin, VllmError

RESYNC_SECONDS = 3.0
IDLE_UNLOAD_ANNOTATION = "serving.loraserve.dev/idle-unload-after"
# After a rollback the previous version stays loaded this long, so flipping back is instant.
WARM_GRACE = timedelta(minutes=10)
MAX_BACKOFF = 60.0
# (addon uid, replica, served name) -> (retry at, next delay, the failure that set it)
_backoff: dict[tuple[str, str, str], tuple[float, float, addons.Refusal]] = {}


def _epoch(text: str | None) -> float | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _stamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions(
    ready: bool, reconciling: bool, stalled: bool, reason: str, message: str, gen: int, now: str
) -> list[dict[str, Any]]:
    def cond(t: str, s: bool) -> dict[str, Any]:
        return {
            "type": t,
            "status": str(s),
            "reason": reason,
            "message": message,
            "observedGeneration": gen,
            "lastTransitionTime": now,
        }

    return [cond("Ready", ready), cond("Reconciling", reconciling), cond("Stalled", stalled)]


def _verdict(
    base: dict[str, Any], state: str, reason: str, message: str, flags: tuple[bool, bool, bool], gen: int, now: str
) -> dict[str, Any]:
    """A status: state, reason, message and the kstatus conditions (Ready, Reconciling, Stalled) = flags."""
    ready, reconciling, stalled = flags
    conditions = _conditions(ready, reconciling, stalled, reason, message, gen, now)
    return {**base, "state": state, "reason": reason, "message": message, "conditions": conditions}


async def _observe(session: aiohttp.ClientSession, name: str, ip: str) -> addons.Replica | None:
    try:
        loaded = await VllmAdmin(f"http://{ip}:{MODEL_SERVER_PORT}", session).loaded_adapters()
    except VllmError:
        return None  # not answering: treated as not having anything; retried next round
    return addons.Replica(name, ip, frozenset(loaded))


async def _load(
    session: aiohttp.ClientSession, uid: str, step: addons.ReplicaPlan, fetcher_port: int, who: tuple[str, str, str]
) -> list[addons.Refusal]:
    """Fetch and load what `step` asks on its replica; `who` is (namespace, deployment, addon) for metrics."""
    failures = []
    replica = step.replica
    for artifact in step.load:
        key = (uid, replica.name, artifact.served_name)
        retry_at, delay, last = _backoff.get(key, (0.0, 1.0, None))
        if last is not None and time.monotonic() < retry_at:
            failures.append(last)  # still failing as last time; retried with backoff
            continue
        try:
            async with session.post(
                f"http://{replica.ip}:{fetcher_port}/fetch",
                json={"name": artifact.served_name, "uri": artifact.uri, "digest": artifact.digest},
                timeout=aiohttp.ClientTimeout(total=1800),
            ) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if not isinstance(body, dict) or (resp.status == 200 and not isinstance(body.get("path"), str)):
                    # Not our fetcher's answer (a proxy, a crash page): its text never reaches status.
                    raise addons_error("AdapterFetchFailed", f"the fetcher answered HTTP {resp.status}")
                if resp.status != 200:
                    reason, message = body.get("reason"), body.get("message")
                    if not isinstance(reason, str) or not isinstance(message, str):
                        reason, message = "AdapterFetchFailed", f"the fetcher answered HTTP {resp.status}"
                    raise addons_error(reason, message)
                path = body["path"]
            await VllmAdmin(f"http://{replica.ip}:{MODEL_SERVER_PORT}", session).load_adapter(
                artifact.served_name, path
            )
            _backoff.pop(key, None)
            record_adapter_load(*who)
        except AdapterLoadError as exc:
            refusal = addons.Refusal("AdapterLoadFailed", f"{artifact.served_name} on {replica.name}: {exc.message}")
            failures.append(refusal)
            _backoff[key] = (time.monotonic() + delay, min(delay * 2, MAX_BACKOFF), refusal)
            record_adapter_load_failure(*who, refusal.reason)
        except _FetchFailed as exc:
            refusal = addons.Refusal(exc.reason, f"{artifact.served_name} on {replica.name}: {exc}")
            failures.append(refusal)
            _backoff[key] = (time.monotonic() + delay, min(delay * 2, MAX_BACKOFF), refusal)
            record_adapter_load_failure(*who, refusal.reason)
        except (aiohttp.ClientError, TimeoutError, VllmError) as exc:
            failures.append(addons.Refusal("ReplicaUnreachable", f"{replica.name}: {exc}"))
            record_adapter_load_failure(*who, "ReplicaUnreachable")
    return failures


class _FetchFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def addons_error(reason: str, message: str) -> _FetchFailed:
    return _FetchFailed(reason, message)


async def _unload(session: aiohttp.ClientSession, replica: addons.Replica, names: list[str], fetcher_port: int) -> None:
    admin = VllmAdmin(f"http://{replica.ip}:{MODEL_SERVER_PORT}", session)
    for name in names:
        try:
            await admin.unload_adapter(name)
            async with session.delete(
                f"http://{replica.ip}:{fetcher_port}/adapters/{name}", timeout=aiohttp.ClientTimeout(total=30)
            ):
                pass
        except (aiohttp.ClientError, TimeoutError, VllmError):
            pass  # the next round tries again


def _read_versions(namespace: str, spec: LoraAddonSpec) -> dict[str, ModelVersionSpec | None]:
    versions: dict[str, ModelVersionSpec | None] = {}
    for target in spec.targets:
        obj = kube().get_custom("modelversions", target.model_version, namespace)
        versions[target.model_version] = ModelVersionSpec.model_validate(obj["spec"]) if obj else None
    return versions


def _version_bases(namespace: str) -> dict[str, str]:
    """ModelVersion name -> its base model URI, for the whole namespace (one list)."""
    listed = kube().custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "modelversions")["items"]
    return {
        item["metadata"]["name"]: str(((item.get("spec") or {}).get("baseModel") or {}).get("name")) for item in listed
    }


def _serverless_pool(
    name: str, namespace: str, spec: LoraAddonSpec, versions: dict[str, ModelVersionSpec | None]
) -> str | addons.Refusal:
    """The shared pool Deployment for the addon's base model (created on first use), or why not."""
    base_model = addons.pool_base(spec, versions)
    if isinstance(base_model, addons.Refusal):
        return base_model
    pool = addons.pool_name(base_model)
    listed = kube().custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "loraaddons")["items"]
    members = addons.pool_members(pool, base_model, listed, _version_bases(namespace))
    if name in {n for _, _, n in members} and addons.pool_seat(name, members) >= addons.POOL_CAPACITY:
        return addons.Refusal(
            "ServerlessPoolFull",
            f"the serverless pool {pool} already serves {addons.POOL_CAPACITY} addons; give this addon its own "
            "Deployment (spec.deployment)",
        )
    if kube().get_custom("deployments", pool, namespace) is None:
        overrides = json.loads(os.environ.get("LORASERVE_SERVERLESS_POOL_SPEC", "{}"))
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Deployment",
            "metadata": {"name": pool, "labels": {POOL_LABEL: "true"}},
            "spec": addons.pool_spec(base_model, overrides),
        }
        try:
            kube().custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "deployments", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    return pool


def _set_status(patch: kopf.Patch, previous: dict[str, Any], status: dict[str, Any], body: kopf.Body) -> None:
    from loraserve.status import merge_conditions, status_patch

    status["conditions"] = merge_conditions(previous.get("conditions") or [], status["conditions"])
    if previous.get("state") != status["state"] or previous.get("message") != status["message"]:
        if status["state"] == "FAILED" or any(
            c["type"] == "Stalled" and c["status"] == "True" for c in status["conditions"]
        ):
            kopf.warn(body, reason=status["reason"], message=status["message"])
        elif previous.get("state") != status["state"]:
            kopf.info(body, reason=status["reason"], message=status["message"])
    del status["reason"]
    for key, value in status_patch(previous, status).items():
        patch.status[key] = value


def _rollback(
    body: kopf.Body,
    spec: LoraAddonSpec,
    generation: int,
    previous: dict[str, Any],
    versions: dict[str, ModelVersionSpec],
    counters: dict[rollback.SeriesKey, rollback.Counters],
    key: tuple[str, str, str],
    memo: Any,
    now: datetime,
) -> rollback.Decision:
    """Feed this round's router counters into the addon's window (kept in its Kopf memo), decide, and send
    the Event when the rule fires or is re-armed."""
    window = parse_window(spec.auto_rollback.window) if spec.auto_rollback else 0.0
    mine = {k[3]: c for k, c in counters.items() if k[:3] == key}
    history: rollback.History = memo.setdefault("rollback", rollback.History())
    history.add(now.timestamp(), mine, window)
    labels = {name: v.version for name, v in versions.items()}
    rearm = (body.metadata.annotations or {}).get(REARM_ANNOTATION)
    decision = rollback.decide(spec, generation, rearm, previous.get("autoRollback"), labels, history.delta(), now)
    if decision.rearmed:
        memo["rollback"] = fresh = rollback.History()  # errors before the re-arm do not count again
        fresh.add(now.timestamp(), mine, window)
        kopf.info(body, reason="RollbackRearmed", message=f"routing by the spec's weights again ({decision.status})")
    if decision.fired is not None and decision.status is not None:
        kopf.warn(body, reason="RolledBack", message=f"{decision.status['message']} at {decision.status['at']}")
    return decision


async def reconcile_addon(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, memo: Any) -> None:
    name, namespace, uid = str(body.metadata.name), str(body.metadata.namespace), str(body.metadata.uid)
    generation = int(body.metadata.get("generation") or 0)
    previous = dict(body.status or {})
    now = datetime.now(UTC)
    stamp = _stamp(now)
    base: dict[str, Any] = {"observedGeneration": generation}

    def refuse(reason: str, message: str) -> None:
        failed = _verdict(base, "FAILED", reason, message, (False, False, True), generation, stamp)
        _set_status(patch, previous, failed, body)

    try:
        spec = LoraAddonSpec.model_validate(dict(body.spec))
    except ValidationError as exc:
        message = str(exc).replace("\n", " ")
        refuse("InvalidSpec", message)
        return
    versions = await asyncio.to_thread(_read_versions, namespace, spec)
    if spec.deployment is None:
        seat = await asyncio.to_thread(_serverless_pool, name, namespace, spec, versions)
        if isinstance(seat, addons.Refusal):
            refuse(seat.reason, seat.message)
            return
        deployment_name = seat
    else:
        deployment_name = spec.deployment
    obj = await asyncio.to_thread(kube().get_custom, "deployments", deployment_name, namespace)
    deployment = DeploymentSpec.model_validate(obj["spec"]) if obj else None
    base.update(deployment=deployment_name, versions=addons.weights_text(name, spec, versions))
    refusal = addons.check(name, spec, deployment_name, deployment, versions)
    if refusal is not None:
        refuse(refusal.reason, refusal.message)
        return
    present = {k: v for k, v in versions.items() if v is not None}
    wanted = addons.artifacts(name, spec, present)
    # Idle addons are unloaded (freeing their GPU slot) and load again when a request comes: the router holds
    # a request for an adapter no replica has, and reports it in flight, which wakes it here.
    async with aiohttp.ClientSession() as session:
        settings = AutoscalerSettings.from_env()
        demand = (await router_addon_signals(session, settings)).get((namespace, deployment_name, name))
        counters = await router_version_counters(session, settings)
    decision = _rollback(
        body, spec, generation, previous, present, counters, (namespace, deployment_name, name), memo, now
    )
    base.update(effectiveTargets=decision.effective, autoRollback=decision.status)
    if decision.status and decision.status.get("rolledBack"):
        # `kubectl get lora` shows the weights traffic really follows
        labels = {t["modelVersion"]: v.version for t in decision.effective if (v := present.get(t["modelVersion"]))}
        base["versions"] = ",".join(
            f"{labels.get(t['modelVersion'], t['modelVersion'])}:{t['weight']}" for t in decision.effective
        )
    last_request = max(
        t
        for t in (
            demand.last_request if demand else None,
            _epoch(previous.get("lastRequestTime")),
            _epoch(body.metadata.get("creationTimestamp")),
            _epoch(previous.get("loadedAt")),
        )
        if t is not None
    )
    idle_after = parse_window(
        (body.metadata.annotations or {}).get(IDLE_UNLOAD_ANNOTATION)
        or os.environ.get("LORASERVE_ADDON_IDLE_UNLOAD_AFTER", "168h")
    )
    idle = now.timestamp() - last_request >= idle_after and not (demand and demand.in_flight > 0)
    if demand and demand.in_flight > 0:
        last_request = max(last_request, now.timestamp())
    base["lastRequestTime"] = _stamp(datetime.fromtimestamp(last_request, UTC))
    if idle:
        wanted = []
    elif previous.get("state") == "UNLOADED":
        base["loadedAt"] = stamp  # woken: a fresh idle period starts now
    wanted_names = {a.served_name for a in wanted}

    # Versions dropped from the targets stay loaded (warm) for a grace period: rollback is a pointer flip.
    retired = addons.keep_warm(
        previous.get("retired") or {}, list(previous.get("servedNames") or []), wanted_names, now, WARM_GRACE, idle
    )

    pods = await asyncio.to_thread(kube().list_pods, namespace, selector_labels(deployment_name))
    fetcher_port = ManifestSettings.from_env().fetcher_port
    auth = model_server_tokens().authorization(namespace, deployment_name)  # vLLM and the fetcher demand it
    async with aiohttp.ClientSession(headers=auth) as session:
        observed = await asyncio.gather(*(_observe(session, n, ip) for n, ip in ready_replicas(pods)))
        replicas = [r for r in observed if r is not None]
        failures: list[addons.Refusal] = []
        for step in addons.plan(name, wanted, set(retired), replicas):
            if step.unload:
                await _unload(session, step.replica, step.unload, fetcher_port)
            if step.load:
                failures += await _load(session, uid, step, fetcher_port, (namespace, deployment_name, name))
        after = await asyncio.gather(*(_observe(session, r.name, r.ip) for r in replicas))
    loaded = sum(1 for r in after if r is not None and wanted_names <= r.loaded)
    total = len(ready_replicas(pods))
    base.update(loadedReplicas=loaded, totalReplicas=total, servedNames=sorted(wanted_names), retired=retired)
    if failures:
        first = failures[0]
        message = "; ".join(f.message for f in failures[:3])
        status = _verdict(
            base, "FAILED" if loaded == 0 else "LOADING", first.reason, message, (False, False, True), generation, stamp
        )
    elif idle:
        message = f"no request for {idle_after:.0f}s: unloaded; the next request loads it again"
        status = _verdict(base, "UNLOADED", "IdleUnloaded", message, (True, False, False), generation, stamp)
    elif total == 0:
        message = "no ready replica: adapters load on each replica as it becomes ready"
        status = _verdict(base, "PENDING", "NoReadyReplicas", message, (True, False, False), generation, stamp)
    elif loaded < total:
        message = f"loaded on {loaded}/{total} ready replicas"
        status = _verdict(base, "LOADING", "Loading", message, (False, True, False), generation, stamp)
    else:
        message = f"loaded on {loaded}/{total} ready replicas"
        status = _verdict(base, "READY", "AdaptersLoaded", message, (True, False, False), generation, stamp)
    assert deployment is not None
    status["conditions"].append(await _capacity(namespace, deployment_name, deployment, generation, stamp))
    if decision.condition is not None:
        fired, reason, text = decision.condition
        status["conditions"].append(
            {
                "type": "RolledBack",
                "status": str(fired),
                "reason": reason,
                "message": text,
                "observedGeneration": generation,
                "lastTransitionTime": stamp,
            }
        )
    _set_status(patch, previous, status, body)


async def _capacity(
    namespace: str, deployment_name: str, deployment: DeploymentSpec, gen: int, now: str
) -> dict[str, Any]:
    """More adapters than maxLoras is allowed (vLLM swaps them) but costs latency: say so."""
    listed = await asyncio.to_thread(
        kube().custom.list_namespaced_custom_object, GROUP, VERSION, namespace, "loraaddons"
    )
    served = sum(
        len(a.get("spec", {}).get("targets", []))
        for a in listed["items"]
        if a.get("spec", {}).get("deployment") == deployment_name
    )
    over = served > deployment.effective_max_loras
    message = f"{served} adapter versions for {deployment.effective_max_loras} GPU slots (maxLoras)"
    return {
        "type": "OverCapacity",
        "status": str(over),
        "reason": "AdaptersExceedMaxLoras" if over else "WithinMaxLoras",
        "message": message,
        "observedGeneration": gen,
        "lastTransitionTime": now,
    }


@kopf.on.resume(GROUP, VERSION, "loraaddons")
@kopf.on.create(GROUP, VERSION, "loraaddons")
@kopf.on.update(GROUP, VERSION, "loraaddons", field="spec")
async def loraaddon_changed(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    await reconcile_addon(body, patch, logger, memo)


@kopf.timer(GROUP, VERSION, "loraaddons", interval=RESYNC_SECONDS, sharp=True)
async def loraaddon_resync(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    # Replicas come and go (scale-out, restarts that forget adapters): every round re-checks each one; the
    # automatic rollback's window gets a sample of the router's counters.
    await reconcile_addon(body, patch, logger, memo)


@kopf.on.delete(GROUP, VERSION, "loraaddons")
async def loraaddon_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    # A serverless addon is unloaded from the pool it was seated in.
    deployment_name = addon_deployment({"spec": dict(body.spec), "status": dict(body.status or {})})
    if not deployment_name:
        return
    pods = await asyncio.to_thread(kube().list_pods, namespace, selector_labels(deployment_name))
    fetcher_port = ManifestSettings.from_env().fetcher_port
    auth = model_server_tokens().authorization(namespace, deployment_name)
    async with aiohttp.ClientSession(headers=auth) as session:
        for replica in await asyncio.gather(*(_observe(session, n, ip) for n, ip in ready_replicas(pods))):
            if replica is not None:
                await _unload(
                    session, replica, sorted(n for n in replica.loaded if addons.owned_by(name, n)), fetcher_port
                )
    logger.info(f"unloaded addon {name} from {deployment_name}")


# -- the serverless pools' garbage collection -------------------------------------------------------------
POOL_GC_SECONDS = 10.0


@kopf.timer(GROUP, VERSION, "deployments", interval=POOL_GC_SECONDS, labels={POOL_LABEL: "true"})
async def serverless_pool_gc(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    """A serverless pool with no addon left and no traffic is deleted (an Event first); never while any addon
    is seated in it or any request is in flight, held or recent. The next serverless addon creates it again."""
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    base_model = str(body.spec.get("baseModel") or "")
    if body.metadata.get("deletionTimestamp") or addons.pool_name(base_model) != name:
        return  # not a pool the operator made (a user's copy of the label), or already going
    listed = await asyncio.to_thread(
        kube().custom.list_namespaced_custom_object, GROUP, VERSION, namespace, "loraaddons"
    )
    bases = await asyncio.to_thread(_version_bases, namespace)
    members = addons.pool_members(name, base_model, listed["items"], bases)
    async with aiohttp.ClientSession() as session:
        signal = (await router_signals(session, AutoscalerSettings.from_env())).get((namespace, name))
    last_request = _epoch(dict(body.status or {}).get("lastRequestTime"))
    if signal is not None and signal.last_request is not None:
        last_request = max(last_request or 0.0, signal.last_request)
    verdict = addons.pool_gc(
        len(members),
        signal.in_flight if signal else 0.0,
        signal.held if signal else 0.0,
        last_request,
        _epoch(body.metadata.get("creationTimestamp")) or time.time(),
        time.time(),
        parse_window(os.environ.get("LORASERVE_SERVERLESS_POOL_GC_AFTER", "10m")),
    )
    if not verdict.delete:
        return
    kopf.info(body, reason="ServerlessPoolDeleted", message=f"serverless pool {name} deleted: {verdict.reason}")
    try:
        await asyncio.to_thread(
            kube().custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, "deployments", name
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
    logger.info(f"deleted serverless pool {name}: {verdict.reason}")
