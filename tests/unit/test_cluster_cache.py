"""The watch-fed cache the operator reconciles from: a listing never undoes a newer event, events alone never
claim a complete picture, and only readiness changes wake the addons."""

from __future__ import annotations

import copy
import json
from typing import Any

from loraserve.handlers.cache import LAST_APPLIED, ClusterCache, replica_view, slim
from loraserve.handlers.load import ready_replicas
from loraserve.resources.model_server import SPEC_HASH_ANNOTATION
from loraserve.status import crash_looping, unschedulable

KEY = ("ns", "chat")


def pod(name: str, rv: int, ready: bool = True, ip: str | None = "10.0.0.1", restarts: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": str(rv)},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": str(ready)}],
            "containerStatuses": [{"name": "vllm", "restartCount": restarts}],
        },
    }


def names(cache: ClusterCache) -> set[str]:
    return {p["metadata"]["name"] for p in cache.pod_list(KEY) or []}


def test_events_alone_are_not_a_listing() -> None:
    cache = ClusterCache()
    cache.pod_event(KEY, "ADDED", pod("a", 5))
    assert cache.pod_list(KEY) is None  # the caller must list: other pods may exist that no event showed yet
    cache.fill_pods(KEY, [pod("a", 5), pod("b", 4)], 6)
    assert names(cache) == {"a", "b"}


def test_a_listing_keeps_newer_events() -> None:
    cache = ClusterCache()
    cache.pod_event(KEY, "ADDED", pod("late", 12))  # created after the list was answered
    cache.pod_event(KEY, "MODIFIED", pod("a", 11, ready=True))
    cache.pod_event(KEY, "DELETED", pod("gone", 13))
    cache.fill_pods(KEY, [pod("a", 7, ready=False), pod("gone", 8)], 10)
    assert names(cache) == {"a", "late"}
    a = next(p for p in cache.pod_list(KEY) or [] if p["metadata"]["name"] == "a")
    assert a["metadata"]["resourceVersion"] == "11"


def test_a_newer_listing_replaces_older_events() -> None:
    cache = ClusterCache()
    cache.fill_pods(KEY, [pod("a", 3), pod("b", 4)], 5)
    cache.fill_pods(KEY, [pod("b", 9)], 20)  # a left while no event was heard (a watch gap)
    assert names(cache) == {"b"}


def test_stale_events_are_ignored_and_only_replica_changes_wake() -> None:
    cache = ClusterCache()
    cache.fill_pods(KEY, [], 1)
    assert cache.pod_event(KEY, "ADDED", pod("a", 5, ready=False, ip=None))
    assert cache.pod_event(KEY, "MODIFIED", pod("a", 6, ready=True))  # became ready: addons load
    assert not cache.pod_event(KEY, "MODIFIED", pod("a", 7, ready=True))  # nothing an addon cares about
    assert cache.pod_event(KEY, "MODIFIED", pod("a", 8, ready=True, restarts=1))  # vLLM restarted: adapters gone
    assert not cache.pod_event(KEY, "MODIFIED", pod("a", 3, ready=False))  # older than what we have
    assert cache.pod_event(KEY, "DELETED", pod("a", 9))
    assert names(cache) == set()


def test_versions_wake_only_on_spec_changes() -> None:
    cache = ClusterCache()
    mv = {"metadata": {"name": "v1", "resourceVersion": "3"}, "spec": {"version": 1}}
    assert cache.version_event(("ns", "v1"), "ADDED", mv)
    status_only = {**mv, "metadata": {"name": "v1", "resourceVersion": "4"}, "status": {"state": "READY"}}
    assert not cache.version_event(("ns", "v1"), "MODIFIED", status_only)
    assert cache.version_event(("ns", "v1"), "DELETED", status_only)
    assert cache.versions[("ns", "v1")] is None


def test_forget_frees_a_deleted_deployment() -> None:
    cache = ClusterCache()
    cache.fill_pods(KEY, [pod("a", 1)], 2)
    cache.fill_child(KEY, {"metadata": {"resourceVersion": "2"}})
    cache.forget(KEY)
    assert KEY not in cache.pods
    assert KEY not in cache.children


def test_what_is_kept_is_what_the_decisions_read() -> None:
    """At 1,000 Deployments the operator keeps thousands of pods and children: only the fields its decisions
    read are kept (the pod spec, the child's template and server-side apply's bookkeeping are dropped), and
    every decision made on what is kept is the one made on the whole object."""
    container_spec = {"name": "vllm", "image": "vllm", "args": ["--port", "8000"] * 20, "env": [{"name": "A"}] * 20}
    spec = {"containers": [container_spec], "volumes": [{"name": "models", "emptyDir": {}}]}
    managed = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    pending = {
        "metadata": {"name": "p", "resourceVersion": "3", "managedFields": managed, "labels": {"a": "b"}},
        "spec": spec,
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
                    "lastProbeTime": None,
                }
            ],
        },
    }
    crashing = {
        "metadata": {"name": "c", "resourceVersion": "4"},
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.2",
            "initContainerStatuses": [{"name": "fetch", "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}],
            "containerStatuses": [
                {
                    "name": "vllm",
                    "restartCount": 4,
                    "image": "vllm",
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": "CUDA out of memory"}},
                }
            ],
        },
    }
    deleting = pod("d", 5) | {"spec": spec}
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    whole = [pending, crashing, pod("r", 6) | {"spec": spec}, deleting]
    cache = ClusterCache()
    cache.fill_pods(KEY, [copy.deepcopy(p) for p in whole[:2]], 4)
    for one in whole[2:]:
        cache.pod_event(KEY, "ADDED", copy.deepcopy(one))
    kept = sorted(cache.pod_list(KEY) or [], key=lambda p: p["metadata"]["name"])
    whole.sort(key=lambda p: p["metadata"]["name"])
    assert all("spec" not in p and "managedFields" not in p["metadata"] for p in kept)
    assert unschedulable(kept) == unschedulable(whole) == ("GPUStockout", pending["status"]["conditions"][0]["message"])
    assert crash_looping(kept) == crash_looping(whole) is not None
    assert "CUDA out of memory" in (crash_looping(kept) or "")
    assert ready_replicas(kept) == ready_replicas(whole) == [("r", "10.0.0.1")]
    assert [replica_view(p) for p in kept] == [replica_view(p) for p in whole]

    child = {
        "metadata": {
            "name": "chat",
            "resourceVersion": "3",
            "generation": 2,
            "managedFields": managed,
            "annotations": {SPEC_HASH_ANNOTATION: "abc", "deployment.kubernetes.io/revision": "2"},
        },
        "spec": {"replicas": 2, "template": {"spec": spec}},
        "status": {"observedGeneration": 2, "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2},
    }
    cache.child_event(KEY, "ADDED", copy.deepcopy(child))
    assert cache.children[KEY] == {
        "metadata": {
            "name": "chat",
            "resourceVersion": "3",
            "generation": 2,
            "annotations": {SPEC_HASH_ANNOTATION: "abc"},
        },
        "spec": {"replicas": 2},
        "status": child["status"],
    }


def test_kept_bodies_share_their_strings_and_drop_kubectls_copy() -> None:
    """Each watch event is its own JSON document, with its own copy of every key and condition reason: what the
    operator keeps of thousands of addons shares them, and drops kubectl's last-applied copy of the object."""
    text = json.dumps(
        {
            "metadata": {
                "name": "chat",
                "annotations": {LAST_APPLIED: "{...}", "team": "search"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "status": {"conditions": [{"type": "Ready", "status": "True", "message": "x" * 100}]},
        }
    )
    first, second = json.loads(text), json.loads(text)
    slim(first)
    slim(second)
    assert first == second
    assert first["metadata"] == {"name": "chat", "annotations": {"team": "search"}}
    (one,), (other,) = first["status"]["conditions"], second["status"]["conditions"]
    assert all(a is b for a, b in zip(one, other, strict=True))  # the keys
    assert one["status"] is other["status"]
    assert one["type"] is other["type"]
    assert one["message"] == other["message"]  # long strings are left as they are
