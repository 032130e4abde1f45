"""LoraAddon -> its adapters loaded on every ready replica of its Deployment (and unloaded when gone)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

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
from loraserve.handlers import deployment as deployments
from loraserve.handlers.cache import slim
from loraserve.handlers.deployment import kube, model_server_tokens, observed_pods, observed_version
from loraserve.handlers.follow import Looks, resync_seconds
from loraserve.handlers.load import (
    SCRAPE_LISTENERS,
    VERSIONS_WANTED,
    latest_addon_signals,
    latest_version_counters,
    ready_replicas,
    router_signals,
)
from loraserve.handlers.metrics import record_adapter_load, record_adapter_load_failure
from loraserve.handlers.threads import Threads
from loraserve.kube import ADDON_CALLS_IN_FLIGHT, api_error_text
from loraserve.settings import operator_settings
from loraserve.status import caught_up, condition, kstatus_conditions, merge_conditions, since_written, status_patch
from loraserve.vllm.admin import AdapterLoadError, VllmAdmin, VllmError
from loraserve.vllm.fetch_client import FetcherClient, FetchFailed

LOG = logging.getLogger(__name__)
T = TypeVar("T")
# An addon is looked at when it, its Deployment, its replicas or its ModelVersions change, when a request is
# held for it, or when one of its own deadlines comes (see addons.next_look), else at its slow resync
# (follow.resync_seconds).
COALESCE_SECONDS = 0.2
# Adapters loaded on a replica, as last asked: shared by every addon on it, asked again after this long.
LOADED_TTL = 2.0
# A replica that did not answer is asked again this soon.
UNREACHABLE_RETRY = 5.0
IDLE_UNLOAD_ANNOTATION = "serving.loraserve.dev/idle-unload-after"
# After a rollback the previous version stays loaded this long, so flipping back is instant.
WARM_GRACE = timedelta(minutes=10)
MAX_BACKOFF = 60.0
# In an addon's Kopf memo: (replica, served name) -> (retry at (epoch), next delay, the failure that set it)
Backoff = dict[tuple[str, str], tuple[float, float, addons.Refusal]]


def _epoch(text: str | None) -> float | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _stamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _verdict(
    base: dict[str, Any], state: str, reason: str, message: str, flags: tuple[bool, bool, bool], gen: int, now: str
) -> dict[str, Any]:
    """A status: state, reason, message and the kstatus conditions (Ready, Reconciling, Stalled) = flags."""
    ready, reconciling, stalled = flags
    conditions = kstatus_conditions(ready, reconciling, stalled, reason, message, gen, now)
    return {**base, "state": state, "reason": reason, "message": message, "conditions": conditions}


class LoadedAdapters:
    """What each replica's vLLM has loaded, asked once and shared by every addon reconciling on it (ten addons
    created together on one Deployment ask each replica once, not ten times)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Loads and unloads that finished while the replica was being asked: its answer may predate them.
        self._during: dict[tuple[str, str], list[tuple[str, bool]]] = {}

    async def observe(self, session: aiohttp.ClientSession, name: str, ip: str) -> addons.Replica | None:
        key = (name, ip)
        async with self._locks.setdefault(key, asyncio.Lock()):
            seen = self._seen.get(key)
            if seen is None or time.monotonic() - seen[0] > LOADED_TTL:
                self._during[key] = []
                try:
                    loaded = set(await VllmAdmin(f"http://{ip}:{MODEL_SERVER_PORT}", session).loaded_adapters())
                except VllmError:
                    self._seen.pop(key, None)
                    return None  # not answering: treated as not having anything; asked again soon
                finally:
                    during = self._during.pop(key, [])
                for adapter, present in during:
                    (loaded.add if present else loaded.discard)(adapter)
                seen = self._seen[key] = (time.monotonic(), frozenset(loaded))
        return addons.Replica(name, ip, seen[1])

    def changed(self, replica: addons.Replica, loaded: str | None = None, unloaded: str | None = None) -> None:
        key = (replica.name, replica.ip)
        moves = ([(loaded, True)] if loaded else []) + ([(unloaded, False)] if unloaded else [])
        if key in self._during:
            self._during[key] += moves
        if key in self._seen:
            at, names = self._seen[key]
            for adapter, present in moves:
                names = names | {adapter} if present else names - {adapter}
            self._seen[key] = (at, names)

    def forget(self, pod_names: set[str]) -> None:
        """Replicas that restarted, left or became ready: asked afresh next time."""
        for key in [k for k in self._seen if k[0] in pod_names]:
            del self._seen[key]
        for key in [k for k in self._locks if k[0] in pod_names and not self._locks[k].locked()]:
            del self._locks[key]


LOADED = LoadedAdapters()


# The addons' Kubernetes calls run on threads of their own, never in the queue of the Deployments' calls (their
# children, their status): in a burst of 3,000 addons a Deployment's child was created 30 s after it, behind
# the addons' finalizers and status writes.
ADDON_THREADS = Threads(ADDON_CALLS_IN_FLIGHT, "kube-addons")
kube_call = ADDON_THREADS.call


async def _observe(session: aiohttp.ClientSession, name: str, ip: str) -> addons.Replica | None:
    return await LOADED.observe(session, name, ip)


# One connection pool for every call to the replicas (vLLM's admin API, the fetcher), each look's session
# adding its Deployment's token: a pool per look opened a connection for every call, a tenth of the operator's
# event loop in a burst of creates. Idle connections are closed before vLLM's server drops them (after 5 s),
# so a call never goes out on one the server is closing.
REPLICA_KEEPALIVE = 3.0
_connectors: dict[asyncio.AbstractEventLoop, aiohttp.TCPConnector] = {}


def _replica_session(namespace: str, deployment_name: str) -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    connector = _connectors.get(loop)
    if connector is None or connector.closed:
        connector = _connectors[loop] = aiohttp.TCPConnector(
            limit=256, limit_per_host=16, keepalive_timeout=REPLICA_KEEPALIVE
        )
    auth = model_server_tokens().authorization(namespace, deployment_name)  # vLLM and the fetcher demand it
    return aiohttp.ClientSession(headers=auth, connector=connector, connector_owner=False)


@contextlib.asynccontextmanager
async def _asked_afresh(
    namespace: str, deployment_name: str, pods: list[dict[str, Any]]
) -> AsyncIterator[tuple[aiohttp.ClientSession, list[addons.Replica | None]]]:
    """Each ready replica of the Deployment asked now (not from the shared answers) what it has loaded (None:
    it did not answer), and the session to act on them with."""
    ready = ready_replicas(pods)
    LOADED.forget({pod for pod, _ in ready})
    async with _replica_session(namespace, deployment_name) as session:
        yield session, list(await asyncio.gather(*(_observe(session, n, ip) for n, ip in ready)))


async def _load(
    session: aiohttp.ClientSession,
    backoff: Backoff,
    step: addons.ReplicaPlan,
    fetcher_port: int,
    who: tuple[str, str, str],
) -> list[addons.Refusal]:
    """Fetch and load what `step` asks on its replica; `who` is (namespace, deployment, addon) for metrics."""
    failures = []
    replica = step.replica
    for artifact in step.load:
        key = (replica.name, artifact.served_name)
        retry_at, delay, last = backoff.get(key, (0.0, 1.0, None))
        if last is not None and time.time() < retry_at:
            failures.append(last)  # still failing as last time; retried with backoff
            continue
        try:
            fetcher = FetcherClient(f"http://{replica.ip}:{fetcher_port}", session)
            path = await fetcher.fetch(artifact.served_name, artifact.uri, artifact.digest)
            await VllmAdmin(f"http://{replica.ip}:{MODEL_SERVER_PORT}", session).load_adapter(
                artifact.served_name, path
            )
            backoff.pop(key, None)
            LOADED.changed(replica, loaded=artifact.served_name)
            record_adapter_load(*who)
        except AdapterLoadError as exc:
            refusal = addons.Refusal("AdapterLoadFailed", f"{artifact.served_name} on {replica.name}: {exc.message}")
            failures.append(refusal)
            backoff[key] = (time.time() + delay, min(delay * 2, MAX_BACKOFF), refusal)
            record_adapter_load_failure(*who, refusal.reason)
        except FetchFailed as exc:
            refusal = addons.Refusal(exc.reason, f"{artifact.served_name} on {replica.name}: {exc}")
            failures.append(refusal)
            backoff[key] = (time.time() + delay, min(delay * 2, MAX_BACKOFF), refusal)
            record_adapter_load_failure(*who, refusal.reason)
        except (aiohttp.ClientError, TimeoutError, VllmError) as exc:
            failures.append(addons.Refusal("ReplicaUnreachable", f"{replica.name}: {exc}"))
            record_adapter_load_failure(*who, "ReplicaUnreachable")
    return failures


async def _unload(session: aiohttp.ClientSession, replica: addons.Replica, names: list[str], fetcher_port: int) -> None:
    admin = VllmAdmin(f"http://{replica.ip}:{MODEL_SERVER_PORT}", session)
    for name in names:
        try:
            await admin.unload_adapter(name)
            LOADED.changed(replica, unloaded=name)
            await FetcherClient(f"http://{replica.ip}:{fetcher_port}", session).remove(name)
        except (aiohttp.ClientError, TimeoutError, VllmError):
            pass  # the next round tries again


async def _read_versions(namespace: str, spec: LoraAddonSpec) -> dict[str, ModelVersionSpec | None]:
    versions: dict[str, ModelVersionSpec | None] = {}
    for target in spec.targets:
        obj = await observed_version(namespace, target.model_version)
        versions[target.model_version] = ModelVersionSpec.model_validate(obj["spec"]) if obj else None
    return versions


async def _read_deployment(namespace: str, name: str) -> dict[str, Any] | None:
    """The Deployment CR, as its own loop last saw it (no API call), else asked."""
    watched = deployments.followed(namespace, name)
    if watched is not None:
        return {"spec": dict(watched.spec)}  # live: Kopf keeps it current
    return await kube_call(kube().get_custom, "deployments", name, namespace)


# -- the serverless pools' seats -----------------------------------------------------------------------------
def _is_serverless(spec: kopf.Spec, **_: Any) -> bool:
    return not spec.get("deployment")


@kopf.index(GROUP, VERSION, "loraaddons", when=_is_serverless)
async def serverless_addons(
    namespace: str | None, name: str | None, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[str, dict[str, Any]]:
    """namespace -> each serverless addon (no spec.deployment), as much of it as seating reads. The pools'
    seats and their GC read this instead of listing every addon of the namespace: among 10,000 addons, that was
    a 30 MB list at each look of a serverless addon and every 10 s per pool. Kopf fills it from the full
    listing before any other handler runs, so the GC never takes a pool for empty before its addons are read."""
    return {
        namespace or "": {
            "metadata": {
                "name": name,
                "creationTimestamp": meta.get("creationTimestamp"),
                "deletionTimestamp": meta.get("deletionTimestamp"),
            },
            "spec": {"targets": [{"modelVersion": t.get("modelVersion")} for t in spec.get("targets") or []]},
            "status": {"deployment": status.get("deployment")},
        }
    }


async def _pool_members(
    namespace: str, pool: str, base_model: str, serverless: kopf.Index[str, dict[str, Any]]
) -> list[tuple[bool, str, str]]:
    """The pool's members (see addons.pool_members), from the index. Where this operator seated an addon more
    recently than the addon's last event shows, its own write counts: a watch running behind never gives a
    seat twice."""
    items = []
    for item in serverless.get(namespace, ()):
        followed = _followed.get((namespace, item["metadata"]["name"]))
        if followed is not None and followed.served_on != item["status"]["deployment"]:
            item = {**item, "status": {"deployment": followed.served_on}}
        items.append(item)
    unseated = {
        str(t["modelVersion"]) for item in items if not item["status"]["deployment"] for t in item["spec"]["targets"]
    }
    bases = {}
    for version in unseated:
        obj = await observed_version(namespace, version)  # watch-fed; asked only when never seen
        if obj is not None:
            bases[version] = str(((obj.get("spec") or {}).get("baseModel") or {}).get("name"))
    return addons.pool_members(pool, base_model, items, bases)


async def _serverless_pool(
    name: str,
    namespace: str,
    spec: LoraAddonSpec,
    versions: dict[str, ModelVersionSpec | None],
    serverless: kopf.Index[str, dict[str, Any]],
) -> str | addons.Refusal:
    """The shared pool Deployment for the addon's base model (created on first use), or why not."""
    base_model = addons.pool_base(spec, versions)
    if isinstance(base_model, addons.Refusal):
        return base_model
    pool = addons.pool_name(base_model)
    members = await _pool_members(namespace, pool, base_model, serverless)
    if name in {n for _, _, n in members} and addons.pool_seat(name, members) >= addons.POOL_CAPACITY:
        return addons.Refusal(
            "ServerlessPoolFull",
            f"the serverless pool {pool} already serves {addons.POOL_CAPACITY} addons; give this addon its own "
            "Deployment (spec.deployment)",
        )
    if deployments.followed(namespace, pool) is None:
        await kube_call(_create_pool, namespace, pool, base_model)
    return pool


def _create_pool(namespace: str, pool: str, base_model: str) -> None:
    if kube().get_custom("deployments", pool, namespace) is not None:
        return
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Deployment",
        "metadata": {"name": pool, "labels": {POOL_LABEL: "true"}},
        "spec": addons.pool_spec(base_model, dict(operator_settings().serverless_pool_spec)),
    }
    try:
        kube().create_custom("deployments", namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise


def _set_status(patch: kopf.Patch, previous: dict[str, Any], status: dict[str, Any], body: kopf.Body) -> None:
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
    mine: dict[str, rollback.Counters] | None,
    memo: Any,
    now: datetime,
) -> rollback.Decision:
    """Feed this round's router counters (`mine`: per version label; None: not read this round) into the
    addon's window (kept in its Kopf memo), decide, and send the Event when the rule fires or is re-armed."""
    window = parse_window(spec.auto_rollback.window) if spec.auto_rollback else 0.0
    history: rollback.History = memo.setdefault("rollback", rollback.History())
    if mine is not None:  # a round without them is no sample: read as zeros, the next would count all since
        history.add(now.timestamp(), mine, window)
    labels = {name: v.version for name, v in versions.items()}
    rearm = (body.metadata.annotations or {}).get(REARM_ANNOTATION)
    decision = rollback.decide(spec, generation, rearm, previous.get("autoRollback"), labels, history.delta(), now)
    if decision.rearmed:
        memo["rollback"] = fresh = rollback.History()  # errors before the re-arm do not count again
        if mine is not None:
            fresh.add(now.timestamp(), mine, window)
        kopf.info(body, reason="RollbackRearmed", message=f"routing by the spec's weights again ({decision.status})")
    if decision.fired is not None and decision.status is not None:
        kopf.warn(body, reason="RolledBack", message=f"{decision.status['message']} at {decision.status['at']}")
    return decision


async def reconcile_addon(
    body: kopf.Body, patch: kopf.Patch, memo: dict[str, Any], serverless: kopf.Index[str, dict[str, Any]]
) -> float | None:
    """Observe, decide, execute; returns the seconds until the addon must be looked at again when nothing
    wakes it sooner (None: only when woken). `serverless` is the index of the serverless addons."""
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    generation = int(body.metadata.get("generation") or 0)
    previous = since_written(body, memo.get("written"))
    now = datetime.now(UTC)
    stamp = _stamp(now)
    base: dict[str, Any] = {"observedGeneration": generation}
    settings = operator_settings()

    def refuse(reason: str, message: str) -> float:
        failed = _verdict(base, "FAILED", reason, message, (False, False, True), generation, stamp)
        _set_status(patch, previous, failed, body)
        return resync_seconds()  # a fix comes as an event (the spec, the Deployment, a ModelVersion)

    try:
        spec = LoraAddonSpec.model_validate(dict(body.spec))
    except ValidationError as exc:
        message = str(exc).replace("\n", " ")
        return refuse("InvalidSpec", message)
    versions = await _read_versions(namespace, spec)
    if spec.deployment is None:
        seat = await _serverless_pool(name, namespace, spec, versions, serverless)
        if isinstance(seat, addons.Refusal):
            return refuse(seat.reason, seat.message)
        deployment_name = seat
    else:
        deployment_name = spec.deployment
    moved_from = previous.get("deployment")
    if moved_from and moved_from != deployment_name:
        await _unload_addon(namespace, str(moved_from), name)  # moved to another Deployment: leave the old
    obj = await _read_deployment(namespace, deployment_name)
    deployment = DeploymentSpec.model_validate(obj["spec"]) if obj else None
    base.update(deployment=deployment_name, versions=addons.weights_text(name, spec, versions))
    refusal = addons.check(name, spec, deployment_name, deployment, versions)
    if refusal is not None:
        return refuse(refusal.reason, refusal.message)
    present = {k: v for k, v in versions.items() if v is not None}
    wanted = addons.artifacts(name, spec, present)
    # Idle addons are unloaded (freeing their GPU slot) and load again when a request comes: the router holds
    # a request for an adapter no replica has, and reports it in flight, which wakes it here. The routers are
    # read every tick by one scraper for the whole operator (see load.scrape_routers), not by each look.
    demand = latest_addon_signals().get((namespace, deployment_name, name))
    counters: dict[str, rollback.Counters] | None = None
    if spec.auto_rollback is None:
        _with_rule.discard((namespace, name))
    else:
        _with_rule.add((namespace, name))  # the routers' per-version counters are read from the next scrape
        counters = latest_version_counters((namespace, deployment_name, name))
    decision = _rollback(body, spec, generation, previous, present, counters, memo, now)
    base.update(effectiveTargets=decision.effective, autoRollback=decision.status)
    if decision.status and decision.status.get("rolledBack"):
        # `kubectl get lora` shows the weights traffic really follows
        labels = {t["modelVersion"]: v.version for t in decision.effective if (v := present.get(t["modelVersion"]))}
        base["versions"] = ",".join(
            f"{labels.get(t['modelVersion'], t['modelVersion'])}:{t['weight']}" for t in decision.effective
        )
    annotated_idle = (body.metadata.annotations or {}).get(IDLE_UNLOAD_ANNOTATION)
    idle_after = parse_window(annotated_idle) if annotated_idle else settings.addon_idle_unload_after
    seen = [
        demand.last_request if demand else None,
        _epoch(previous.get("lastRequestTime")),
        _epoch(body.metadata.get("creationTimestamp")),
        _epoch(previous.get("loadedAt")),
    ]
    activity = addons.idleness(
        now.timestamp(), seen, idle_after, demand.in_flight if demand else 0.0, previous.get("state")
    )
    idle = activity.idle
    base["lastRequestTime"] = _stamp(datetime.fromtimestamp(activity.last_request, UTC))
    if idle:
        wanted = []
    elif activity.woken:
        base["loadedAt"] = stamp  # woken: a fresh idle period starts now
    wanted_names = {a.served_name for a in wanted}

    # Versions dropped from the targets stay loaded (warm) for a grace period: rollback is a pointer flip.
    retired = addons.keep_warm(
        previous.get("retired") or {}, list(previous.get("servedNames") or []), wanted_names, now, WARM_GRACE, idle
    )

    pods = await observed_pods(namespace, deployment_name)
    fetcher_port = settings.manifests.fetcher_port
    backoff: Backoff = memo.setdefault("backoff", {})
    async with _replica_session(namespace, deployment_name) as session:
        observed = await asyncio.gather(*(_observe(session, n, ip) for n, ip in ready_replicas(pods)))
        replicas = [r for r in observed if r is not None]
        if replicas:  # kept warm means loaded somewhere: a version that never loaded is not listed as warm
            retired = {k: v for k, v in retired.items() if any(k in r.loaded for r in replicas)}
        failures: list[addons.Refusal] = []
        for step in addons.plan(name, wanted, set(retired), replicas):
            if step.unload:
                await _unload(session, step.replica, step.unload, fetcher_port)
            if step.load:
                failures += await _load(session, backoff, step, fetcher_port, (namespace, deployment_name, name))
        after = await asyncio.gather(*(_observe(session, r.name, r.ip) for r in replicas))
    loaded = sum(1 for r in after if r is not None and wanted_names <= r.loaded)
    total = len(ready_replicas(pods))
    base.update(loadedReplicas=loaded, totalReplicas=total, servedNames=sorted(wanted_names), retired=retired)
    judged = addons.verdict(failures, idle, idle_after, loaded, total)
    flags = (judged.ready, judged.reconciling, judged.stalled)
    status = _verdict(base, judged.state, judged.reason, judged.message, flags, generation, stamp)
    assert deployment is not None
    status["conditions"].append(_capacity(namespace, deployment_name, deployment, generation, stamp))
    if decision.condition is not None:
        fired, reason, text = decision.condition
        status["conditions"].append(condition("RolledBack", fired, reason, text, generation, stamp))
    _set_status(patch, previous, status, body)
    unreachable = len(replicas) < total or len(after) != len([r for r in after if r is not None])
    sampling = (
        settings.autoscaler.tick
        if spec.auto_rollback is not None and len(spec.targets) > 1 and not (decision.status or {}).get("rolledBack")
        else None
    )
    due = addons.next_look(
        now,
        # no resync of its own: its Deployment's resync checks the replicas for all its addons (_check_replicas)
        resync=UNREACHABLE_RETRY if unreachable or (loaded < total and not failures) else math.inf,
        idle_at=None if activity.idle_at is None else datetime.fromtimestamp(activity.idle_at, UTC),
        warm_until=addons.warm_until(retired, WARM_GRACE),
        retry_at=[datetime.fromtimestamp(at, UTC) for at, _, _ in backoff.values()],
        sample_every=sampling,
    )
    return None if math.isinf(due) else due


def _capacity(namespace: str, deployment_name: str, deployment: DeploymentSpec, gen: int, now: str) -> dict[str, Any]:
    """Counted from the addons' watch events (no API call)."""
    served = _served_versions.get((namespace, deployment_name), 0)
    over, reason, message = addons.capacity(served, deployment.effective_max_loras)
    return condition("OverCapacity", over, reason, message, gen, now)


# Held on every addon this operator has looked at, so that its adapters leave its replicas before it goes
# (`kubectl delete` returns once they have). The operator's own, not Kopf's: addons have no Kopf daemon.
FINALIZER = "serving.loraserve.dev/unload-adapters"


def _pack(raw: kopf.RawBody) -> str:
    """An addon's object as it is kept between its events: compact JSON, decoded when looked at. At 10,000
    addons the objects themselves were thousands of small dicts, lists and strings each (3 KB per addon, and
    the fragmentation of replacing them at every status write); their text is one string of about 1 KB."""
    return json.dumps(raw, separators=(",", ":"))


_HANDLER_CONTEXT: list[contextvars.Context] = []


def _handler_context() -> contextvars.Context:
    """The context of the first addon handler: Kopf's Event queue is set in it (what the looks need of it)."""
    if not _HANDLER_CONTEXT:
        _HANDLER_CONTEXT.append(contextvars.copy_context())
    return _HANDLER_CONTEXT[0]


class Followed:
    """A LoraAddon the operator follows: its latest body (from its watch events), its state between looks
    (written status, backoff, rollback window), and its looks. No task of its own while idle."""

    def __init__(self, key: tuple[str, str], raw: kopf.RawBody, serverless: kopf.Index[str, dict[str, Any]]) -> None:
        self._keep(raw)
        self.namespace, self.name = key
        self.serverless = serverless  # Kopf's index of the serverless addons (one for the operator's life)
        self.memo: dict[str, Any] = {}
        self.seen: tuple[Any, ...] = ()
        self.served_on: str | None = None
        self.finalizing: asyncio.Task[None] | None = None
        self.looks = Looks(self.look, COALESCE_SECONDS, UNREACHABLE_RETRY, self.may_look, _handler_context())

    @property
    def raw(self) -> kopf.RawBody:
        """The addon as its latest event brought it (a fresh copy)."""
        raw: kopf.RawBody = json.loads(self._packed)
        return raw

    @property
    def body(self) -> kopf.Body:
        return kopf.Body(self.raw)

    def _keep(self, raw: kopf.RawBody) -> None:
        self._packed = _pack(raw)
        # What is read of every followed addon at once (after each scrape of the routers, at a ModelVersion's
        # change), kept beside the text so that those reads decode nothing.
        status = raw.get("status") or {}
        self.state: str | None = status.get("state")
        self.last_request_time: str | None = status.get("lastRequestTime")
        self.model_versions = frozenset(
            str(t.get("modelVersion")) for t in (raw.get("spec") or {}).get("targets") or []
        )

    def update(self, event: kopf.RawEvent) -> None:
        """The addon's latest event: its object is the body from now on; once it shows the status this operator
        last wrote, that copy is dropped (see since_written)."""
        self._keep(event["object"])
        if caught_up(event["object"], self.memo.get("written")):
            del self.memo["written"]

    def wake(self) -> None:
        self.looks.wake()

    def may_look(self) -> bool:
        """Not while its Deployment exists but this operator does not follow it: its loop is starting (and wakes
        its addons when it has), the Deployment is being deleted, or this operator paused for a peer (Kopf
        stopped the Deployments' loops)."""
        placed = self.served_on
        return (
            placed is None
            or deployments.followed(self.namespace, placed) is not None
            or not _known(self.namespace, placed)
        )

    async def look(self, _: bool) -> float | None:
        body, name, namespace = self.body, self.name, self.namespace
        if body.metadata.get("deletionTimestamp"):
            return None
        patch = kopf.Patch()
        try:
            finalizers = list(body.metadata.get("finalizers") or [])
            if FINALIZER not in finalizers and self.memo.get("finalizer") != body.metadata.get("resourceVersion"):
                version = str(body.metadata.get("resourceVersion"))
                try:
                    await kube_call(
                        kube().set_finalizers, "loraaddons", name, namespace, [*finalizers, FINALIZER], version
                    )
                    self.memo["finalizer"] = version  # added onto this version: its event brings it back
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    self.seen = ()  # changed meanwhile: its event wakes the next look, which adds it
            due = await reconcile_addon(body, patch, self.memo, self.serverless)
            if patch.status:
                await kube_call(
                    kube().patch_custom_status, "loraaddons", name, namespace, {"status": dict(patch.status)}
                )
                self.memo.setdefault("written", {}).update(patch.status)  # see since_written
        except ApiException as exc:
            if exc.status == 404:
                return None  # deleted meanwhile
            LOG.warning(f"reconcile of addon {namespace}/{name} failed, retrying: {api_error_text(exc)}")
            return UNREACHABLE_RETRY
        placed = patch.status.get("deployment") or body.spec.get("deployment")
        if placed:
            _place((namespace, name), self, placed)  # a serverless addon's pool is known now
        return due

    async def finalize(self) -> None:
        """Deleted: no look from now on, the one under way ends (cancelled after STOP_GRACE); then its adapters
        leave its replicas, so no load lands after the unload, and the finalizer goes. An operator killed before
        that does it again on its start (the addon is listed with its deletionTimestamp and the finalizer); an
        unload that fails is left to the sweep the addon's DELETED event asks for."""
        key = (self.namespace, self.name)
        await self.looks.stop(STOP_GRACE)
        if _followed.get(key) is self:
            _place(key, self, None)
            del _followed[key]
            _with_rule.discard(key)
        deployment_name = addon_deployment(self.body)
        try:
            if deployment_name:
                await _unload_addon(self.namespace, deployment_name, self.name)
                LOG.info(f"unloaded addon {self.namespace}/{self.name} from {deployment_name}")
        except Exception as exc:  # a task of its own: nothing above it would report the error
            LOG.warning(f"unload of deleted addon {self.namespace}/{self.name} failed (left to the sweep): {exc!r}")
        finally:
            await _release(self.namespace, self.name, self.body)


async def _release(namespace: str, name: str, body: kopf.Body) -> None:
    """The finalizer off, onto the latest version (a conflict: read again and retry)."""
    obj: dict[str, Any] | None = dict(body)
    for _ in range(5):
        metadata = (obj or {}).get("metadata") or {}
        finalizers = list(metadata.get("finalizers") or [])
        if obj is None or FINALIZER not in finalizers:
            return
        try:
            await kube_call(
                kube().set_finalizers,
                "loraaddons",
                name,
                namespace,
                [f for f in finalizers if f != FINALIZER],
                str(metadata.get("resourceVersion")),
            )
            return
        except ApiException as exc:
            if exc.status == 404:
                return
            if exc.status != 409:
                LOG.warning(f"finalizer of deleted addon {namespace}/{name} not removed: {api_error_text(exc)}")
                return
        obj = await kube_call(kube().get_custom, "loraaddons", name, namespace)


# (namespace, name) -> the addon this operator follows; added on its first event, removed when it is deleted.
_followed: dict[tuple[str, str], Followed] = {}
# (namespace, deployment) -> the names of the followed addons served there (a pod event wakes only those).
_by_deployment: dict[tuple[str, str], set[str]] = {}


def _place(key: tuple[str, str], followed: Followed, deployment_name: str | None) -> None:
    if followed.served_on == deployment_name:
        return
    if followed.served_on is not None:
        names = _by_deployment.get((key[0], followed.served_on), set())
        names.discard(key[1])
        if not names:
            _by_deployment.pop((key[0], followed.served_on), None)
    followed.served_on = deployment_name
    if deployment_name is not None:
        _by_deployment.setdefault((key[0], deployment_name), set()).add(key[1])


# Deleted (or the operator stopping), the look under way ends before the addon's adapters are unloaded; it is
# cancelled only if it takes longer than this.
STOP_GRACE = 20.0


def _follow(key: tuple[str, str], raw: kopf.RawBody, serverless: kopf.Index[str, dict[str, Any]]) -> Followed:
    followed = _followed[key] = Followed(key, raw, serverless)
    _place(key, followed, (raw.get("spec") or {}).get("deployment") or (raw.get("status") or {}).get("deployment"))
    return followed


def _finalize(followed: Followed) -> None:
    if followed.finalizing is None:
        followed.finalizing = asyncio.create_task(followed.finalize())


@kopf.on.cleanup()
async def stop_looks(**_: Any) -> None:
    """The operator stopping: looks under way end (nothing is unloaded: the addons still exist); deletions under
    way finish."""
    followed = list(_followed.values())
    await asyncio.gather(*(f.looks.stop(STOP_GRACE) for f in followed))
    await asyncio.gather(*(f.finalizing for f in followed if f.finalizing is not None), return_exceptions=True)
    _HANDLER_CONTEXT.clear()  # holds this run's Event queue
    connector = _connectors.pop(asyncio.get_running_loop(), None)
    if connector is not None:
        await connector.close()
    ADDON_THREADS.shutdown()


# Adapter versions per Deployment, for the OverCapacity condition: (namespace, deployment) -> count, kept
# from the addons' events; each addon's share is remembered so that an edit or a deletion moves the count.
_served_versions: dict[tuple[str, str], int] = {}
_addon_share: dict[tuple[str, str], tuple[str, int]] = {}


def _count_versions(key: tuple[str, str], share: tuple[str, int] | None) -> None:
    """Record an addon's (deployment, versions); the addons of a Deployment whose count moved look again."""
    before = _addon_share.pop(key, None)
    if share is not None and share[0]:
        _addon_share[key] = share
    else:
        share = None
    if before == share:
        return
    namespace = key[0]
    for deployment_name, delta in ([(before[0], -before[1])] if before else []) + ([share] if share else []):
        total = _served_versions.get((namespace, deployment_name), 0) + delta
        if total > 0:
            _served_versions[(namespace, deployment_name)] = total
        else:
            _served_versions.pop((namespace, deployment_name), None)
        _wake_served_on(namespace, deployment_name)


# (namespace, addon) -> the Deployment its last event placed it on; when it leaves one, that one is swept.
_placed: dict[tuple[str, str], str] = {}


@kopf.on.event(GROUP, VERSION, "loraaddons")
async def loraaddon_event(
    event: kopf.RawEvent,
    name: str | None,
    namespace: str | None,
    body: kopf.Body,
    **kwargs: Any,
) -> None:
    """The addon's first event starts following it; a spec change (a new generation) or a re-arm annotation
    wakes it, its own status writes do not; its deletion unloads it. A Deployment the addon left (moved or
    deleted) is swept of anything of it still loaded."""
    slim(event["object"], share_strings=False)  # kept (as text) as the addon's body until its next event
    key = (namespace or "", name or "")
    deleted = event.get("type") == "DELETED"
    _count_versions(key, None if deleted else (body.spec.get("deployment") or "", len(body.spec.get("targets") or [])))
    left = _placed.pop(key, "")
    if not deleted:
        _placed[key] = addon_deployment(body) or ""
    if left and left != _placed.get(key):
        _sweep_later(key[0], left, kwargs["addon_placements"])
    followed = _followed.get(key)
    if deleted or body.metadata.get("deletionTimestamp"):
        if followed is None and not deleted and FINALIZER in (body.metadata.get("finalizers") or []):
            # its deletion began while no operator was acting
            followed = _follow(key, event["object"], kwargs["serverless_addons"])
        if followed is not None:
            followed.update(event)
            _finalize(followed)
        return
    if followed is None:
        followed = _follow(key, event["object"], kwargs["serverless_addons"])
    followed.update(event)
    seen = (
        body.metadata.get("generation"),
        (body.metadata.annotations or {}).get(REARM_ANNOTATION),
        (body.metadata.annotations or {}).get(IDLE_UNLOAD_ANNOTATION),
    )
    if seen != followed.seen:
        followed.seen = seen
        followed.wake()


def _wake_served_on(namespace: str, deployment_name: str) -> None:
    for name in _by_deployment.get((namespace, deployment_name), ()):
        followed = _followed.get((namespace, name))
        if followed is not None:
            followed.wake()


def _replicas_changed(namespace: str, deployment_name: str) -> None:
    """A replica became ready, restarted (forgetting its adapters) or left: its addons look again."""
    pods = deployments.CACHE.pod_list((namespace, deployment_name)) or []
    LOADED.forget({p["metadata"]["name"] for p in pods} | _gone_replicas(namespace, deployment_name))
    _wake_served_on(namespace, deployment_name)


def _gone_replicas(namespace: str, deployment_name: str) -> set[str]:
    entry = deployments.CACHE.pods.get((namespace, deployment_name))
    return set(entry.gone) if entry else set()


def _version_changed(namespace: str, version: str) -> None:
    for (ns, _), followed in list(_followed.items()):
        if ns == namespace and version in followed.model_versions:
            followed.wake()


# (namespace, Deployment) -> its generation, for every Deployment CR seen (created and not yet deleted).
_deployment_generations: dict[tuple[str, str], Any] = {}


def _known(namespace: str, deployment_name: str) -> bool:
    return (namespace, deployment_name) in _deployment_generations


@kopf.on.event(GROUP, VERSION, "deployments")
async def deployment_event(
    event: kopf.RawEvent,
    name: str | None,
    namespace: str | None,
    body: kopf.Body,
    **kwargs: Any,
) -> None:
    """A Deployment created, deleted or re-specified (enableAddons, maxLoras): its addons look again."""
    key = (namespace or "", name or "")
    generation = None if event.get("type") == "DELETED" else body.metadata.get("generation")
    if key not in _deployment_generations and generation is not None and body.spec.get("enableAddons"):
        # First seen (created, or this operator started): what did a killed one leave loaded?
        _sweep_later(*key, kwargs["addon_placements"])
    if _deployment_generations.get(key, "unseen") != generation:
        _deployment_generations[key] = generation
        _wake_served_on(*key)
    if generation is None:
        _deployment_generations.pop(key, None)


def _wake_on_demand() -> None:
    """After each scrape of the routers: an addon with a request in flight that is not READY (unloaded when
    idle, or still loading) looks at once; one whose last request moved well past its status looks too."""
    for (ns, _dep, addon), signal in latest_addon_signals().items():
        followed = _followed.get((ns, addon))
        if followed is None:
            continue
        recorded = _epoch(followed.last_request_time) or 0.0
        if (signal.in_flight > 0 and followed.state != "READY") or (
            signal.last_request is not None and signal.last_request - recorded > LAST_REQUEST_STALE
        ):
            followed.wake()


# The followed addons with an automatic rollback rule: only while there is one are the routers asked for their
# per-version counters (most of what they would send).
_with_rule: set[tuple[str, str]] = set()
VERSIONS_WANTED.append(lambda: bool(_with_rule))

# lastRequestTime in status may lag the routers' by this much (it is written when the addon is looked at).
LAST_REQUEST_STALE = 60.0
SCRAPE_LISTENERS.append(_wake_on_demand)
deployments.POD_LISTENERS.append(_replicas_changed)
deployments.FOLLOW_LISTENERS.append(_wake_served_on)


_checks: dict[tuple[str, str], asyncio.Task[None]] = {}


def _check_later(namespace: str, deployment_name: str) -> None:
    if (namespace, deployment_name) in _by_deployment and (namespace, deployment_name) not in _checks:
        _checks[(namespace, deployment_name)] = asyncio.create_task(_check_replicas(namespace, deployment_name))


async def _check_replicas(namespace: str, deployment_name: str) -> None:
    """The addons' slow resync, at their Deployment's: each ready replica is asked once what it has loaded, and
    only the addons it is out of step with look again (an addon has no resync of its own: at 10,000 addons
    that was 15 looks a second on an idle operator)."""
    try:
        pods = await observed_pods(namespace, deployment_name)
        async with _asked_afresh(namespace, deployment_name, pods) as (_, replicas):
            loaded = [None if replica is None else replica.loaded for replica in replicas]
        for name in list(_by_deployment.get((namespace, deployment_name), ())):
            followed = _followed.get((namespace, name))
            if followed is not None and addons.out_of_step(name, dict(followed.raw.get("status") or {}), loaded):
                followed.wake()
    except Exception as exc:  # a task of its own: nothing above it would report the error
        LOG.warning(f"resync of the addons on {namespace}/{deployment_name} failed: {exc!r}")
    finally:
        _checks.pop((namespace, deployment_name), None)


deployments.RESYNC_LISTENERS.append(_check_later)
deployments.VERSION_LISTENERS.append(_version_changed)


async def _unload_addon(namespace: str, deployment_name: str, name: str) -> None:
    """Every version of addon `name` off every ready replica of `deployment_name` (best effort: a replica
    that does not answer keeps it until it restarts)."""
    pods = await kube_call(kube().list_pods, namespace, selector_labels(deployment_name))
    fetcher_port = operator_settings().manifests.fetcher_port
    async with _asked_afresh(namespace, deployment_name, pods) as (session, replicas):  # nothing of it may stay
        for replica in replicas:
            if replica is not None:
                owned = sorted(n for n in replica.loaded if addons.owned_by(name, n))
                await _unload(session, replica, owned, fetcher_port)


# -- adapters nobody owns any more ---------------------------------------------------------------------------
@kopf.index(GROUP, VERSION, "loraaddons")
async def addon_placements(
    namespace: str | None, name: str | None, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], str]:
    """(namespace, addon) -> the Deployment it is served on ("" while a serverless addon is not seated). Kopf
    fills it from the full listing before any other handler runs, so an absent addon is really gone."""
    return {(namespace or "", name or ""): addon_deployment({"spec": spec, "status": status}) or ""}


# A sweep waits this long after what asked for it, so a burst of deletions on one Deployment is one sweep.
SWEEP_DELAY = 2.0
_sweeps: dict[tuple[str, str], asyncio.Task[None]] = {}


def _sweep_later(namespace: str, deployment_name: str, placements: kopf.Index[tuple[str, str], str]) -> None:
    key = (namespace, deployment_name)
    if key in _sweeps:
        return  # one is pending; it reads the replicas and the addons when it runs
    _sweeps[key] = asyncio.create_task(_sweep(namespace, deployment_name, placements))


async def _sweep(namespace: str, deployment_name: str, placements: kopf.Index[tuple[str, str], str]) -> None:
    """Unload what no addon on `deployment_name` owns: an unload lost to an operator killed between an addon's
    load and its status write, its move or its deletion. The owners of what was unloaded look again (one that
    came back meanwhile loads it again)."""
    try:
        await asyncio.sleep(SWEEP_DELAY)
        del _sweeps[(namespace, deployment_name)]  # what changes from here on asks for a sweep of its own

        def placed_on(addon: str) -> str | None:
            found = placements.get((namespace, addon))
            return next(iter(found), "") if found else None

        pods = await observed_pods(namespace, deployment_name)
        fetcher_port = operator_settings().manifests.fetcher_port
        async with _asked_afresh(namespace, deployment_name, pods) as (session, replicas):
            for replica in replicas:
                orphans = addons.orphaned(deployment_name, replica.loaded, placed_on) if replica else []
                if replica is not None and orphans:
                    await _unload(session, replica, orphans, fetcher_port)
                    LOG.info(f"unloaded {orphans} from {replica.name}: no addon on {deployment_name} owns them")
                    for served_name in orphans:
                        owner = _followed.get((namespace, served_name.rsplit("-", 1)[0]))
                        if owner is not None:
                            owner.wake()
    except Exception as exc:  # a task of its own: nothing above it would report the error
        LOG.warning(f"sweep of {namespace}/{deployment_name} failed (the next event sweeps again): {exc!r}")
    finally:
        if _sweeps.get((namespace, deployment_name)) is asyncio.current_task():
            del _sweeps[(namespace, deployment_name)]


@kopf.on.cleanup()
async def stop_sweeps(**_: Any) -> None:
    for task in list(_sweeps.values()):
        task.cancel()


# -- the serverless pools' garbage collection -------------------------------------------------------------
POOL_GC_SECONDS = 10.0


@kopf.timer(GROUP, VERSION, "deployments", interval=POOL_GC_SECONDS, labels={POOL_LABEL: "true"})
async def serverless_pool_gc(body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
    """A serverless pool with no addon left and no traffic is deleted (an Event first); never while any addon
    is seated in it or any request is in flight, held or recent. The next serverless addon creates it again."""
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    base_model = str(body.spec.get("baseModel") or "")
    if body.metadata.get("deletionTimestamp") or addons.pool_name(base_model) != name:
        return  # not a pool the operator made (a user's copy of the label), or already going
    members = await _pool_members(namespace, name, base_model, kwargs["serverless_addons"])
    async with aiohttp.ClientSession() as session:
        signal = (await router_signals(session, operator_settings().autoscaler)).get((namespace, name))
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
        operator_settings().serverless_pool_gc_after,
    )
    if not verdict.delete:
        return
    kopf.info(body, reason="ServerlessPoolDeleted", message=f"serverless pool {name} deleted: {verdict.reason}")
    try:
        await asyncio.to_thread(kube().delete_custom, "deployments", name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
    logger.info(f"deleted serverless pool {name}: {verdict.reason}", extra={"k8s_skip": True})  # Event above
