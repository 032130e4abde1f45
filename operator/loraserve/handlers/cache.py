"""What the operator has seen of the cluster, kept current by watch events, so a reconcile reads memory instead
of asking the API server again (the model-server pods and apps/v1 Deployments of each Deployment CR, and the
ModelVersions).

Filled two ways: the watch events Kopf delivers, and a LIST/GET when something is asked that no event has
brought yet (or when a Deployment's loop starts and resyncs). A listing never undoes a newer event: entries
carry their resourceVersion and the newer one wins."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loraserve.resources.model_server import SPEC_HASH_ANNOTATION

Key = tuple[str, str]  # (namespace, name)

# What the operator reads of a pod and of a child apps/v1 Deployment (status, readiness, the Stalled reasons, the
# spec hash): the rest, the pod spec and the child's template, is most of each object's memory and is dropped as
# the object enters the cache. A nested dict keeps those keys of a dict (or of each dict in a list); True keeps
# the value whole.
Fields = Mapping[str, "Fields | bool"]
_CONTAINER: Fields = {
    "name": True,
    "restartCount": True,
    "state": {"waiting": True},
    "lastState": {"terminated": {"message": True}},
}
POD_FIELDS: Fields = {
    "metadata": {"name": True, "namespace": True, "resourceVersion": True, "deletionTimestamp": True},
    "status": {
        "phase": True,
        "podIP": True,
        "conditions": {"type": True, "status": True, "reason": True, "message": True},
        "initContainerStatuses": _CONTAINER,
        "containerStatuses": _CONTAINER,
    },
}
CHILD_FIELDS: Fields = {
    "metadata": {
        "name": True,
        "namespace": True,
        "resourceVersion": True,
        "generation": True,
        "annotations": {SPEC_HASH_ANNOTATION: True},
    },
    "spec": {"replicas": True},
    "status": {"observedGeneration": True, "replicas": True, "readyReplicas": True, "updatedReplicas": True},
}


def project(value: Any, fields: Fields) -> Any:
    """`value` with only `fields` kept (see POD_FIELDS)."""
    if isinstance(value, list):
        return [project(item, fields) for item in value]
    if isinstance(value, str) and len(value) <= SHARED_STRING_MAX:
        return sys.intern(value)
    if not isinstance(value, Mapping):
        return value
    return {
        key: value[key] if keep is True else project(value[key], keep)  # type: ignore[arg-type]
        for key, keep in fields.items()
        if key in value and value[key] is not None
    }


def _rv(obj: dict[str, Any]) -> int:
    # The API server's resourceVersions are opaque strings; etcd's are increasing integers, which is what
    # every conformant server runs. An unreadable one counts as oldest.
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Strings up to this long are shared between objects (condition types and reasons, keys, names, "True"): each
# JSON document parsed brings its own copy of every key, thousands of bytes per object.
SHARED_STRING_MAX = 64


def _shared(value: Any) -> Any:
    """`value` with its dict keys and short strings replaced by the interpreter's shared copies, in place."""
    if isinstance(value, dict):
        items = [(sys.intern(k) if isinstance(k, str) else k, _shared(v)) for k, v in value.items()]
        value.clear()
        value.update(items)
    elif isinstance(value, list):
        value[:] = [_shared(v) for v in value]
    elif isinstance(value, str) and len(value) <= SHARED_STRING_MAX:
        return sys.intern(value)
    return value


def slim(obj: Mapping[str, Any] | None, share_strings: bool = True) -> None:
    """`obj` as the operator keeps it in memory: without metadata.managedFields (server-side apply's record of
    who wrote what, never read here; about half of a small object's memory) and kubectl's last-applied copy of
    the object, with strings shared between objects (unless it is kept as text). In place: the watch event's
    own dict is also what Kopf keeps as a followed object's live body."""
    metadata = None if obj is None else obj.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict):
            annotations.pop(LAST_APPLIED, None)
    if share_strings:
        _shared(obj)


def replica_view(pod: dict[str, Any]) -> tuple[bool, str | None, int]:
    """What the addons care about in a pod: ready, its IP, and how often its containers restarted (a restarted
    vLLM forgot its adapters)."""
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return ready and not pod["metadata"].get("deletionTimestamp"), status.get("podIP"), restarts


@dataclass
class PodSet:
    """The model-server pods of one Deployment CR, by pod name."""

    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    gone: dict[str, int] = field(default_factory=dict)  # pod name -> resourceVersion of its deletion
    listed: bool = False  # events alone never say a pod is absent: complete only once listed


@dataclass
class ClusterCache:
    pods: dict[Key, PodSet] = field(default_factory=dict)  # by (namespace, Deployment CR name)
    children: dict[Key, dict[str, Any] | None] = field(default_factory=dict)  # by (namespace, Deployment CR name)
    versions: dict[Key, dict[str, Any] | None] = field(default_factory=dict)  # ModelVersions by (namespace, name)

    # -- events ----------------------------------------------------------------------------------------------
    def pod_event(self, key: Key, event_type: str | None, pod: dict[str, Any]) -> bool:
        """Record a pod event; True when the pod's readiness, IP or restarts changed (addons must look)."""
        entry = self.pods.setdefault(key, PodSet())
        pod = project(pod, POD_FIELDS)
        name = pod["metadata"]["name"]
        before = entry.pods.get(name)
        if before is not None and _rv(before) > _rv(pod):
            return False
        if event_type == "DELETED":
            entry.pods.pop(name, None)
            entry.gone[name] = _rv(pod)
            return before is not None and replica_view(before)[0]
        entry.pods[name] = pod
        return before is None or replica_view(before) != replica_view(pod)

    def child_event(self, key: Key, event_type: str | None, child: dict[str, Any]) -> None:
        child = project(child, CHILD_FIELDS)
        before = self.children.get(key)
        if before is not None and _rv(before) > _rv(child):
            return
        self.children[key] = None if event_type == "DELETED" else child

    def version_event(self, key: Key, event_type: str | None, version: dict[str, Any]) -> bool:
        """Record a ModelVersion event; True when its spec changed (or it came or went)."""
        slim(version)
        before = self.versions.get(key)
        if before is not None and _rv(before) > _rv(version):
            return False
        after = None if event_type == "DELETED" else version
        self.versions[key] = after
        return (before or {}).get("spec") != (after or {}).get("spec")

    # -- listings --------------------------------------------------------------------------------------------
    def fill_pods(self, key: Key, listed: list[dict[str, Any]], list_rv: int) -> None:
        """A LIST's answer, merged with what events brought meanwhile (the newer of the two wins)."""
        entry = self.pods.get(key) or PodSet()
        listed = [project(pod, POD_FIELDS) for pod in listed]
        fresh = {p["metadata"]["name"]: p for p in listed if entry.gone.get(p["metadata"]["name"], -1) <= list_rv}
        for name, pod in entry.pods.items():
            if _rv(pod) > list_rv or (name in fresh and _rv(pod) > _rv(fresh[name])):
                fresh[name] = pod
        self.pods[key] = PodSet(fresh, {n: rv for n, rv in entry.gone.items() if rv > list_rv}, listed=True)

    def fill_child(self, key: Key, child: dict[str, Any] | None) -> None:
        child = None if child is None else project(child, CHILD_FIELDS)
        before = self.children.get(key)
        if child is None or before is None or _rv(child) >= _rv(before):
            self.children[key] = child

    def fill_version(self, key: Key, version: dict[str, Any] | None) -> None:
        slim(version)
        before = self.versions.get(key)
        if version is None or before is None or _rv(version) >= _rv(before):
            self.versions[key] = version

    def forget(self, key: Key) -> None:
        """A Deployment CR is gone: nothing of it stays in memory."""
        self.pods.pop(key, None)
        self.children.pop(key, None)

    def pod_list(self, key: Key) -> list[dict[str, Any]] | None:
        """The pods, or None when they were never listed (the caller lists them)."""
        entry = self.pods.get(key)
        return None if entry is None or not entry.listed else list(entry.pods.values())
