"""Discovery and scale-from-zero against a REAL kube-apiserver (the local control plane, marker `cluster`).

The examples are applied as a user would; the router watches them, lists what they serve, and wakes a
Deployment at zero by patching spec.replicas (the CR itself while the field is absent, the scale
subresource once it exists). No pods run here, so held requests are cancelled rather than served.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loraserve.local.cluster import LocalCluster
from loraserve.router.discovery import KubernetesDiscovery
from loraserve.router.gateway import Gateway, RouterConfig
from loraserve.router.httpserver import Server
from loraserve.router.kubeapi import KubeClient, load_credentials
from loraserve.router.topology import TopologyStore
from loraserve.router.waker import KubernetesWaker, deployment_path, scale_path
from tests.router.harness import wait_until

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("router-cluster"))
    local.start()
    try:
        local.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        local.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(ROOT / "crds"))
        yield local
    finally:
        local.stop()


@pytest.fixture
async def routed(control_plane: LocalCluster) -> AsyncIterator[tuple[str, KubeClient, Gateway, int]]:
    ns = f"r-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", ns)
    for example in ("multi-lora-deployment.yaml", "modelversions.yaml", "loraaddon-ab.yaml"):
        control_plane.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / example))
    kube = KubeClient(load_credentials(str(control_plane.kubeconfig)))
    store = TopologyStore()
    discovery = KubernetesDiscovery(kube, store, [ns])
    gateway = Gateway(store, KubernetesWaker(kube), config=RouterConfig(wake_interval=0.0))
    server = Server(gateway, 1 << 20)
    port = await server.start("127.0.0.1", 0)
    discovery.start()
    try:
        await discovery.synced.wait()
        yield ns, kube, gateway, port
    finally:
        await server.close()
        await discovery.close()
        await gateway.close()
        await kube.close()
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def replicas(kube: KubeClient, ns: str) -> Any:
    status, obj = await kube.request("GET", deployment_path(ns, "llama-multi"))
    assert status == 200
    return obj["spec"].get("replicas")


async def test_models_from_the_watched_examples(routed: tuple[str, KubeClient, Gateway, int]) -> None:
    ns, _, gateway, port = routed
    await wait_until(lambda: gateway.store.get(ns, "llama-multi") is not None, "the watch")
    state = gateway.store.get(ns, "llama-multi")
    assert state is not None
    await wait_until(lambda: "support-bot" in state.view.addons, "the addon and its versions")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/v1/models") as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["Llama-3.1-8B-Instruct#llama-multi", "support-bot#llama-multi"]
    assert [(v.served_name, v.weight) for v in state.view.addons["support-bot"]] == [
        ("support-bot-v1", 90),
        ("support-bot-v2", 10),
    ]


async def test_request_at_zero_wakes_the_deployment(routed: tuple[str, KubeClient, Gateway, int]) -> None:
    ns, kube, gateway, port = routed
    await wait_until(lambda: gateway.store.get(ns, "llama-multi") is not None, "the watch")
    assert await replicas(kube, ns) is None
    async with aiohttp.ClientSession() as s:
        body = {"model": "support-bot#llama-multi", "prompt": "hi"}
        # Before the operator's first reconcile sets spec.replicas there is no scale to patch, and the router
        # never writes the CR itself (its role may not; GitOps would revert it): the request just waits.
        early = asyncio.create_task(s.post(f"http://127.0.0.1:{port}/v1/completions", json=body))
        await wait_until(lambda: gateway.holds.count((ns, "llama-multi")) == 1, "the request to be held")
        await asyncio.sleep(1.0)
        assert await replicas(kube, ns) is None
        early.cancel()
        await asyncio.gather(early, return_exceptions=True)
        await wait_until(lambda: gateway.holds.count() == 0, "the early request to go")
        # The operator's first reconcile (played here) sets spec.replicas: 0 on a min-0 Deployment.
        status, _ = await kube.request(
            "PATCH",
            deployment_path(ns, "llama-multi"),
            body={"spec": {"replicas": 0}},
            content_type="application/merge-patch+json",
        )
        assert status == 200
        request = asyncio.create_task(s.post(f"http://127.0.0.1:{port}/v1/completions", json=body))
        await wait_until(lambda: gateway.holds.count((ns, "llama-multi")) == 1, "the request to be held")
        for _ in range(600):
            if await replicas(kube, ns) == 1:
                break
            await asyncio.sleep(0.05)
        assert await replicas(kube, ns) == 1  # through the scale subresource
        assert not request.done()  # woken while the request waits, not after

        # Back at zero: the next wake goes through the scale subresource again.
        status, _ = await kube.request(
            "PATCH",
            scale_path(ns, "llama-multi"),
            body={"spec": {"replicas": 0}},
            content_type="application/merge-patch+json",
        )
        assert status == 200
        second = asyncio.create_task(s.post(f"http://127.0.0.1:{port}/v1/completions", json=body))
        await wait_until(lambda: gateway.holds.count((ns, "llama-multi")) == 2, "the second request to be held")
        for _ in range(600):
            if await replicas(kube, ns) == 1:
                break
            await asyncio.sleep(0.05)
        assert await replicas(kube, ns) == 1
        for task in (request, second):
            task.cancel()
        await asyncio.gather(request, second, return_exceptions=True)
    await wait_until(lambda: gateway.holds.count() == 0, "the held requests to go")
    metrics = gateway.metrics.render().decode()
    line = f'loraserve_router_wakeups_total{{deployment="llama-multi",namespace="{ns}"}} '
    assert float(metrics.split(line, 1)[1].split()[0]) >= 2
