"""Operator settings are read once and checked at start: a malformed one names its variable."""

from __future__ import annotations

import pytest

from loraserve.settings import OperatorSettings


def test_defaults() -> None:
    settings = OperatorSettings.from_env({})
    assert settings.autoscaler.tick == 2.0
    assert settings.addon_idle_unload_after == 7 * 86400
    assert settings.serverless_pool_gc_after == 600
    assert dict(settings.serverless_pool_spec) == {}
    assert settings.manifests.fetcher_port == 8001
    assert settings.autoscaler.gpu_meter_every == 300
    assert settings.resync_every == 1800


def test_values_are_parsed() -> None:
    settings = OperatorSettings.from_env(
        {
            "LORASERVE_AUTOSCALE_TICK": "0.5",
            "LORASERVE_ROUTER_LOAD_URLS": "http://r1:9090/load,http://r2:9090/load",
            "LORASERVE_ADDON_IDLE_UNLOAD_AFTER": "90s",
            "LORASERVE_SERVERLESS_POOL_GC_AFTER": "1h",
            "LORASERVE_SERVERLESS_POOL_SPEC": '{"acceleratorType": "NVIDIA_L4"}',
            "LORASERVE_GPU_METER_INTERVAL": "1m",
            "LORASERVE_RESYNC_INTERVAL": "2h",
        }
    )
    assert settings.resync_every == 7200
    assert settings.autoscaler.gpu_meter_every == 60
    assert settings.autoscaler.tick == 0.5
    assert len(settings.autoscaler.router_load_urls) == 2
    assert settings.addon_idle_unload_after == 90
    assert settings.serverless_pool_gc_after == 3600
    assert settings.serverless_pool_spec["acceleratorType"] == "NVIDIA_L4"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("LORASERVE_AUTOSCALE_TICK", "fast"),
        ("LORASERVE_AUTOSCALE_TICK", "0"),
        ("LORASERVE_ROUTER_LOAD_URLS", "router:9090/load"),
        ("LORASERVE_ROUTER_METRICS_URLS", "http://router:9090/metrics"),  # renamed: the start says to what
        ("LORASERVE_ADDON_IDLE_UNLOAD_AFTER", "a week"),
        ("LORASERVE_IDLE_DELETE_AFTER", "-1h"),
        ("LORASERVE_SERVERLESS_POOL_GC_AFTER", "10"),
        ("LORASERVE_SERVERLESS_POOL_SPEC", "{acceleratorType: L4}"),
        ("LORASERVE_SERVERLESS_POOL_SPEC", "[1, 2]"),
        ("LORASERVE_DRAIN_SECONDS", "soon"),
        ("LORASERVE_GPU_METER_INTERVAL", "1s"),
        ("LORASERVE_RESYNC_INTERVAL", "30s"),
        ("LORASERVE_RESYNC_INTERVAL", "often"),
    ],
)
def test_a_malformed_setting_names_its_variable(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=key):
        OperatorSettings.from_env({key: value})


def test_the_operator_does_not_start_on_a_malformed_setting() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LORASERVE_SERVERLESS_POOL_GC_AFTER": "ten minutes", "KUBECONFIG": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-m", "loraserve.cli.main", "operator", "--standalone"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "LORASERVE_SERVERLESS_POOL_GC_AFTER" in done.stderr


def test_peering_lifetime_is_read_with_the_rest() -> None:
    assert OperatorSettings.from_env({"LORASERVE_PEERING_LIFETIME": "30s"}).peering_lifetime == 30
    with pytest.raises(ValueError, match="LORASERVE_PEERING_LIFETIME"):
        OperatorSettings.from_env({"LORASERVE_PEERING_LIFETIME": "1s"})


def test_the_operator_reads_only_model_server_pods_and_deployments() -> None:
    """Server-side label selectors (a handler's label filter alone would read every pod of the cluster): they
    match the labels every model-server pod and apps/v1 Deployment carries, and leave the CRs alone."""
    import kopf
    from kopf._cogs.structs.references import Resource

    from loraserve.api.naming import selector_labels
    from loraserve.operator_main import watch_only_model_servers

    settings = kopf.OperatorSettings()
    watch_only_model_servers(settings)
    pods = Resource("", "v1", "pods", kind="Pod", namespaced=True)
    children = Resource("apps", "v1", "deployments", kind="Deployment", namespaced=True)
    crs = Resource("serving.loraserve.dev", "v1alpha1", "deployments", kind="Deployment", namespaced=True)
    labels = selector_labels("chat")
    for resource in (pods, children):
        (selector,) = settings.watching.label_selectors.collect(resource)
        assert dict(term.split("=") for term in selector.split(",")).items() <= labels.items()
    assert not list(settings.watching.label_selectors.collect(crs))


def test_the_lean_essence_is_kopfs_essence() -> None:
    """Kopf's diff base is built without copying status and managedFields, and comes out the same."""
    import kopf

    from loraserve.operator_main import LeanDiffBaseStorage

    pod = {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {
            "name": "chat-0",
            "namespace": "ns",
            "uid": "u",
            "resourceVersion": "7",
            "labels": {"app": "x"},
            "annotations": {"note": "kept", "serving.loraserve.dev/last-handled-configuration": "{}"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "chat-1", "uid": "r"}],
            "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {"containers": [{"name": "vllm", "image": "v"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    }
    body = kopf.Body(pod)  # type: ignore[arg-type]
    full = kopf.AnnotationsDiffBaseStorage(prefix="serving.loraserve.dev").build(body=body)
    lean = LeanDiffBaseStorage(prefix="serving.loraserve.dev").build(body=body)
    assert lean == full
    assert lean == {
        "spec": {"containers": [{"name": "vllm", "image": "v"}]},
        "metadata": {"labels": {"app": "x"}, "annotations": {"note": "kept"}},
    }


def test_the_essence_is_built_only_for_the_kinds_a_handler_detects_changes_of() -> None:
    """Kinds with no on.create/update/resume handler get no essence (Kopf then finds no change, and looks for
    none); every kind with one gets it: the list of such kinds matches the handlers registered."""
    import kopf

    from loraserve.api.crd import KINDS
    from loraserve.operator_main import CHANGE_DETECTED_KINDS, LeanDiffBaseStorage

    kinds_by_plural = {kind.plural: kind.kind for kind in KINDS}
    detected = {kinds_by_plural[h.selector.any_name] for h in kopf.get_default_registry()._changing.get_all_handlers()}
    assert detected == CHANGE_DETECTED_KINDS
    storage = LeanDiffBaseStorage(prefix="serving.loraserve.dev")
    addon = {"apiVersion": "serving.loraserve.dev/v1alpha1", "kind": "LoraAddon", "metadata": {}, "spec": {"a": 1}}
    assert storage.build(body=kopf.Body(addon)) is None  # type: ignore[arg-type]
    version = {**addon, "kind": "ModelVersion"}
    assert storage.build(body=kopf.Body(version)) == {"spec": {"a": 1}}  # type: ignore[arg-type]


@pytest.mark.looptime
async def test_freed_memory_goes_back_to_the_system_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator's free pages are returned (malloc_trim) every TRIM_SECONDS, off the event loop; where the C
    library has no malloc_trim, nothing runs."""
    import asyncio

    from loraserve import operator_main

    assert operator_main.malloc_trim() is not None  # glibc: the operator image's and this machine's
    calls: list[float] = []
    monkeypatch.setattr(operator_main, "malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    task = asyncio.create_task(operator_main._give_back_freed_memory(operator_main.TRIM_SECONDS))
    await asyncio.sleep(operator_main.TRIM_SECONDS * 3 + 1)
    assert calls == [0, 0, 0]
    task.cancel()
    monkeypatch.setattr(operator_main, "malloc_trim", lambda: None)
    await asyncio.wait_for(operator_main._give_back_freed_memory(operator_main.TRIM_SECONDS), 1)  # returns at once
