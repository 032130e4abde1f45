"""What the router knows about the deployments it serves: pure data and pure updates, no I/O.

Discovery (the Kubernetes watch or a static file) feeds raw objects in; `build_deployments` turns the
Deployment / LoraAddon / ModelVersion custom resources and the EndpointSlices into `DeploymentView`s, and
`TopologyStore` merges them with what only the router knows (in-flight counts, the adapters each replica
reports loaded), keeping `Replica` objects stable across updates so their counters survive.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loraserve.api import naming
from loraserve.durations import DurationError, parse_window

SCALE_FROM_ZERO_TIMEOUT_ANNOTATION = "serving.loraserve.dev/scale-from-zero-timeout"
DEFAULT_SCALE_FROM_ZERO_TIMEOUT = 600.0
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

DeploymentKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One version of an addon as vLLM serves it (`<addon>-<version>`) and its share of the addon's traffic."""

    served_name: str
    version: str
    weight: int
    system_prompt: str | None = None  # the ModelVersion's systemPrompt, applied to chat requests
    prompt_policy: str = "prepend"  # the LoraAddon's systemPromptPolicy


@dataclass(slots=True, eq=False)
class Replica:
    """One ready model-server pod. Identity is the object: the store keeps it while the URL stays ready."""

    url: str
    host: str
    port: int
    deployment: DeploymentKey = ("", "")  # whose token the replica demands
    loaded: frozenset[str] = frozenset()  # adapter served names the replica reports loaded (GET /v1/models)
    models_known: bool = False  # True once the replica answered GET /v1/models at least once
    in_flight: int = 0  # requests the router has sent it and not yet finished


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """A Deployment as the Kubernetes objects describe it (no router state)."""

    namespace: str
    name: str
    base_model: str  # the served name of what the replicas serve without an adapter
    live_merge: bool
    addons_enabled: bool
    addons: Mapping[str, tuple[AdapterVersion, ...]]  # addon name -> routable versions (weight > 0 first)
    replica_urls: tuple[str, ...]
    scale_from_zero_timeout: float = DEFAULT_SCALE_FROM_ZERO_TIMEOUT
    desired_replicas: int | None = None  # spec.replicas
    pool: bool = False  # a serverless pool: its addons are callable by their own name

    @property
    def key(self) -> DeploymentKey:
        return (self.namespace, self.name)


@dataclass(slots=True, eq=False)
class DeploymentState:
    """A Deployment plus the router's view of its ready replicas."""

    view: DeploymentView
    replicas: dict[str, Replica] = field(default_factory=dict)  # url -> replica

    @property
    def namespace(self) -> str:
        return self.view.namespace

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def key(self) -> DeploymentKey:
        return self.view.key

    def ready(self) -> list[Replica]:
        return list(self.replicas.values())

    def adapter_names(self) -> set[str]:
        return {v.served_name for versions in self.view.addons.values() for v in versions}


# ---------------------------------------------------------------------------------------------------------
# Parsing the Kubernetes objects (plain dicts as the API returns them)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def object_key(obj: Mapping[str, Any], default_namespace: str = "default") -> DeploymentKey:
    meta = _meta(obj)
    return (str(meta.get("namespace") or default_namespace), str(meta.get("name") or ""))


def parse_timeout_annotation(annotations: Mapping[str, Any] | None) -> float:
    """The scale-from-zero hold bound from the Deployment's annotation (a Go duration), or the default.

    A malformed or zero value falls back to the default rather than refusing all traffic.
    """
    raw = (annotations or {}).get(SCALE_FROM_ZERO_TIMEOUT_ANNOTATION)
    if not isinstance(raw, str):
        return DEFAULT_SCALE_FROM_ZERO_TIMEOUT
    try:
        seconds = parse_window(raw.strip())
    except DurationError:
        return DEFAULT_SCALE_FROM_ZERO_TIMEOUT
    if not math.isfinite(seconds) or seconds <= 0:
        return DEFAULT_SCALE_FROM_ZERO_TIMEOUT
    return seconds


def replica_url(address: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"http://{address}:{port}"
    if ip.version == 6:
        return f"http://[{address}]:{port}"
    return f"http://{address}:{port}"


def split_url(url: str) -> tuple[str, int]:
    """host and port of an http:// URL (the only scheme replicas speak)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    return host, int(port) if port else 80


def ready_endpoint_urls(slices: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """URLs of the ready endpoints of a Service's EndpointSlices, on the model-server port.

    A nil `ready` condition counts as ready (the EndpointSlice API says consumers should treat unknown as
    ready); terminating endpoints are not ready.
    """
    urls: list[str] = []
    for sl in slices:
        port = naming.MODEL_SERVER_PORT
        for p in sl.get("ports") or []:
            if not isinstance(p, Mapping):
                continue
            if p.get("name") == naming.MODEL_SERVER_PORT_NAME or p.get("port") == naming.MODEL_SERVER_PORT:
                port = int(p.get("port") or naming.MODEL_SERVER_PORT)
                break
        for ep in sl.get("endpoints") or []:
            if not isinstance(ep, Mapping):
                continue
            cond = ep.get("conditions") or {}
            if cond.get("ready") is False or cond.get("terminating") is True:
                continue
            for addr in ep.get("addresses") or []:
                url = replica_url(str(addr), port)
                if url not in urls:
                    urls.append(url)
    return tuple(sorted(urls))


def build_deployments(
    deployments: Iterable[Mapping[str, Any]],
    addons: Iterable[Mapping[str, Any]],
    versions: Iterable[Mapping[str, Any]],
    endpoint_slices: Iterable[Mapping[str, Any]],
    *,
    extra_replicas: Mapping[DeploymentKey, Iterable[str]] | None = None,
) -> dict[DeploymentKey, DeploymentView]:
    """Turn raw custom resources and EndpointSlices into the routable view. Pure; malformed objects are skipped.

    `extra_replicas` adds replica URLs by (namespace, deployment): the static topology source uses it.
    """
    version_by_key: dict[DeploymentKey, str] = {}
    prompt_by_key: dict[DeploymentKey, str] = {}
    for mv in versions:
        spec = mv.get("spec")
        if isinstance(spec, Mapping) and isinstance(spec.get("version"), str):
            version_by_key[object_key(mv)] = spec["version"]
            if isinstance(spec.get("systemPrompt"), str) and spec["systemPrompt"]:
                prompt_by_key[object_key(mv)] = spec["systemPrompt"]

    slices_by_service: dict[DeploymentKey, list[Mapping[str, Any]]] = {}
    for sl in endpoint_slices:
        ns, _ = object_key(sl)
        labels = _meta(sl).get("labels") or {}
        svc = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
        if isinstance(svc, str):
            slices_by_service.setdefault((ns, svc), []).append(sl)

    addons_by_deployment: dict[DeploymentKey, dict[str, tuple[AdapterVersion, ...]]] = {}
    for addon in addons:
        ns, name = object_key(addon)
        spec = addon.get("spec")
        if not name or not isinstance(spec, Mapping):
            continue
        target_deployment = naming.addon_deployment(addon)
        if target_deployment is None:
            continue  # a serverless addon the operator has not seated in its pool yet
        routable: list[AdapterVersion] = []
        policy = spec.get("systemPromptPolicy")
        for target in effective_targets(addon):
            if not isinstance(target, Mapping):
                continue
            mv_key = (ns, str(target.get("modelVersion")))
            version = version_by_key.get(mv_key)
            if version is None:
                continue  # the ModelVersion is not (yet) known: its share goes to the others
            weight = target.get("weight")
            routable.append(
                AdapterVersion(
                    served_name=naming.adapter_served_name(name, version),
                    version=version,
                    weight=weight if isinstance(weight, int) and weight > 0 else 0,
                    system_prompt=prompt_by_key.get(mv_key),
                    prompt_policy=policy if isinstance(policy, str) else "prepend",
                )
            )
        addons_by_deployment.setdefault((ns, target_deployment), {})[name] = tuple(routable)

    out: dict[DeploymentKey, DeploymentView] = {}
    for dep in deployments:
        ns, name = object_key(dep)
        spec = dep.get("spec")
        if not name or not isinstance(spec, Mapping):
            continue
        live_merge = bool(spec.get("modelVersion"))
        base_uri = spec.get("baseModel")
        if live_merge:
            base = name
        elif isinstance(base_uri, str) and base_uri:
            base = naming.base_model_name(base_uri)
        else:
            continue
        addons_enabled = bool(spec.get("enableAddons")) and not live_merge
        key = (ns, name)
        urls = list(ready_endpoint_urls(slices_by_service.get((ns, naming.child_name(name)), [])))
        for url in (extra_replicas or {}).get(key, ()):
            if url not in urls:
                urls.append(url)
        replicas = spec.get("replicas")
        annotations = _meta(dep).get("annotations")
        out[key] = DeploymentView(
            namespace=ns,
            name=name,
            base_model=base,
            live_merge=live_merge,
            addons_enabled=addons_enabled,
            addons=dict(addons_by_deployment.get(key, {})) if addons_enabled else {},
            replica_urls=tuple(urls),
            scale_from_zero_timeout=parse_timeout_annotation(annotations if isinstance(annotations, Mapping) else None),
            desired_replicas=replicas if isinstance(replicas, int) else None,
            pool=isinstance(labels := _meta(dep).get("labels"), Mapping) and labels.get(naming.POOL_LABEL) == "true",
        )
    return out


def effective_targets(addon: Mapping[str, Any]) -> list[Any]:
    """The targets to route by: the spec's, unless the operator's automatic rollback fired for this very
    generation of the spec (then status.effectiveTargets: all to control). A newer spec generation (the
    user's next edit) is routed by at once, before the operator has looked at it."""
    spec = addon.get("spec") or {}
    targets = spec.get("targets") if isinstance(spec, Mapping) else None
    status = addon.get("status")
    if isinstance(status, Mapping):
        rollback = status.get("autoRollback")
        effective = status.get("effectiveTargets")
        if (
            isinstance(rollback, Mapping)
            and rollback.get("rolledBack") is True
            and rollback.get("generation") == _meta(addon).get("generation")
            and isinstance(effective, list)
            and effective
        ):
            return effective
    return targets if isinstance(targets, list) else []


def loaded_adapters_from_models(payload: Any, base_model: str | None = None) -> frozenset[str] | None:
    """The adapters a vLLM replica reports in GET /v1/models: models whose `parent` is set (the base).

    Returns None when the payload is not a model list (the replica answered something else).
    """
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), list):
        return None
    names: set[str] = set()
    for model in payload["data"]:
        if not isinstance(model, Mapping):
            continue
        parent = model.get("parent")
        ident = model.get("id")
        if isinstance(ident, str) and isinstance(parent, str) and parent and (base_model in (None, parent)):
            names.add(ident)
    return frozenset(names)


# ---------------------------------------------------------------------------------------------------------
# The store: deployments plus router-owned replica state


Listener = Callable[[DeploymentKey], None]


class TopologyStore:
    """The router's current topology. Single-threaded (one event loop); every change calls the listeners
    with the key of the deployment that changed, synchronously, so held requests see a new replica before
    any request that arrives later."""

    def __init__(self) -> None:
        self._deployments: dict[DeploymentKey, DeploymentState] = {}
        self._by_name: dict[str, list[DeploymentState]] = {}
        self._listeners: list[Listener] = []
        self.generation = 0

    # -- reading

    def get(self, namespace: str, name: str) -> DeploymentState | None:
        return self._deployments.get((namespace, name))

    def by_name(self, name: str) -> list[DeploymentState]:
        return self._by_name.get(name, [])

    def all(self) -> list[DeploymentState]:
        return [self._deployments[k] for k in sorted(self._deployments)]

    def replicas(self) -> list[tuple[DeploymentState, Replica]]:
        return [(d, r) for d in self._deployments.values() for r in d.replicas.values()]

    # -- writing

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _notify(self, key: DeploymentKey) -> None:
        self.generation += 1
        for listener in list(self._listeners):
            listener(key)

    def replace(self, views: Mapping[DeploymentKey, DeploymentView]) -> list[Replica]:
        """Make the topology exactly `views`. Returns replicas that are new (the caller polls them now)."""
        new_replicas: list[Replica] = []
        changed: list[DeploymentKey] = []
        for key in list(self._deployments):
            if key not in views:
                del self._deployments[key]
                changed.append(key)
        for key, view in views.items():
            state = self._deployments.get(key)
            if state is None:
                state = DeploymentState(view=view)
                self._deployments[key] = state
                changed.append(key)
            elif state.view != view:
                state.view = view
                changed.append(key)
            else:
                continue
            kept: dict[str, Replica] = {}
            for url in view.replica_urls:
                replica = state.replicas.get(url)
                if replica is None:
                    host, port = split_url(url)
                    replica = Replica(url=url, host=host, port=port, deployment=key)
                    new_replicas.append(replica)
                kept[url] = replica
            state.replicas = kept
        self._by_name = {}
        for key in sorted(self._deployments):
            self._by_name.setdefault(key[1], []).append(self._deployments[key])
        for key in changed:
            self._notify(key)
        return new_replicas

    def set_loaded(self, replica: Replica, loaded: frozenset[str]) -> None:
        """Record what a replica reports loaded; listeners hear about it when it changed."""
        first = not replica.models_known
        replica.models_known = True
        if loaded == replica.loaded and not first:
            return
        replica.loaded = loaded
        for state in self._deployments.values():
            if state.replicas.get(replica.url) is replica:
                self._notify(state.key)
