"""The watch-fed cache the operator reconciles from: a listing never undoes a newer event, events alone never
claim a complete picture, and only readiness changes wake the addons."""

from __future__ import annotations

from typing import Any

from loraserve.handlers.cache import ClusterCache

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


def test_what_is_kept_has_no_managed_fields() -> None:
    """At 1,000 Deployments the operator keeps thousands of objects: server-side apply's bookkeeping is dropped,
    the rest (what status and the addons read) is kept."""
    cache = ClusterCache()
    watched, listed = pod("a", 5), pod("b", 3)
    for obj in (watched, listed):
        obj["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    cache.pod_event(KEY, "ADDED", watched)
    cache.fill_pods(KEY, [listed], 4)
    child = {"metadata": {"name": "chat", "resourceVersion": "3", "managedFields": [{}]}, "spec": {"replicas": 2}}
    cache.child_event(KEY, "ADDED", child)
    kept = cache.pod_list(KEY) or []
    assert {p["metadata"]["name"] for p in kept} == {"a", "b"}
    assert all("managedFields" not in p["metadata"] for p in kept)
    assert all(p["status"]["podIP"] == "10.0.0.1" for p in kept)
    assert cache.children[KEY] == {"metadata": {"name": "chat", "resourceVersion": "3"}, "spec": {"replicas": 2}}
