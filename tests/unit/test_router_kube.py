"""Discovery by list-and-watch and the scale-from-zero Waker, against a fake Kubernetes API server (a real
local HTTP server, no mocks of our client)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loraserve.router.discovery import AdapterPoller, KubernetesDiscovery, collection_path
from loraserve.router.gateway import Gateway
from loraserve.router.httpserver import Server
from loraserve.router.kubeapi import KubeClient, KubeCredentials, load_credentials
from loraserve.router.topology import TopologyStore
from loraserve.router.waker import KubernetesWaker, scale_path
from tests.router.fakes import FakeBackend
from tests.router.harness import NS, addon, deployment, endpoint_slice, model_version, wait_until


class FakeApiServer:
    def __init__(self) -> None:
        self.objects: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.watchers: dict[str, list[asyncio.Queue[dict[str, Any]]]] = defaultdict(list)
        self.replicas: dict[str, int | None] = {}
        self.patches: list[tuple[str, str, Any]] = []
        self.patched = asyncio.Event()
        self.requests: list[tuple[str, str]] = []
        self.rv = 10
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def emit(self, path: str, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        items = self.objects[path]
        items[:] = [o for o in items if o["metadata"]["name"] != obj["metadata"]["name"]]
        if kind != "DELETED":
            items.append(obj)
        for q in self.watchers[path]:
            q.put_nowait({"type": kind, "object": obj})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.headers.get("Authorization") != "Bearer test-token":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        parts = request.path.split("/")
        if len(parts) >= 8 and parts[6] == "deployments" and parts[1] == "apis":  # one Deployment, or its scale
            name = parts[7]
            if not request.path.endswith("/scale"):
                return web.json_response({"kind": "Status", "code": 403}, status=403)  # the router's RBAC
            if self.replicas.get(name) is None:  # what kube-apiserver answers before spec.replicas exists
                return web.json_response({"kind": "Status", "code": 500}, status=500)
            if request.method == "PATCH":
                body = await request.json()
                self.patches.append((request.path, request.content_type, body))
                self.replicas[name] = body["spec"]["replicas"]
                self.patched.set()
            spec = {"replicas": self.replicas[name]}
            return web.json_response({"metadata": {"name": name, "resourceVersion": str(self.rv)}, "spec": spec})
        if request.query.get("watch") == "true":
            resp = web.StreamResponse()
            await resp.prepare(request)
            q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            self.watchers[request.path].append(q)
            try:
                while True:
                    await resp.write(json.dumps(await q.get()).encode() + b"\n")
            finally:
                self.watchers[request.path].remove(q)
        return web.json_response({"items": self.objects[request.path], "metadata": {"resourceVersion": str(self.rv)}})


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    yield server
    await server.stop()


def client_for(api: FakeApiServer) -> KubeClient:
    return KubeClient(KubeCredentials(api.url, False, lambda: "Bearer test-token"))


async def test_watch_feeds_the_store_and_releases_held_requests(api: FakeApiServer) -> None:
    backend = FakeBackend(adapters={"bot-v1"})
    await backend.start()
    deps = collection_path("deployments", NS)
    api.objects[deps] = [deployment("d")]
    api.replicas["d"] = 0  # the operator set spec.replicas on its first reconcile
    api.objects[collection_path("loraaddons", NS)] = [addon("bot", "d", [("bot-v1", 100)])]
    api.objects[collection_path("modelversions", NS)] = [model_version("bot-v1", "v1")]
    kube = client_for(api)
    store = TopologyStore()
    poller = AdapterPoller(store, interval=0.05)
    discovery = KubernetesDiscovery(kube, store, [NS], poller)
    gateway = Gateway(store, KubernetesWaker(kube))
    gateway.ready = discovery.synced.is_set
    server = Server(gateway, 1 << 20)
    port = await server.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/health") as r:
        assert r.status == 503  # not ready before the first lists
    discovery.start()
    poller.start()
    try:
        await discovery.synced.wait()
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/health") as r:
            assert r.status == 200
        await wait_until(lambda: store.get(NS, "d") is not None)
        async with aiohttp.ClientSession() as s:
            request = asyncio.create_task(
                s.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "bot#d", "prompt": "x"})
            )
            await api.patched.wait()  # woken while the request is held
            assert not request.done()
            assert api.patches == [
                (
                    scale_path(NS, "d"),  # only the scale subresource: the router never writes the CR
                    "application/merge-patch+json",
                    {"metadata": {"resourceVersion": str(api.rv)}, "spec": {"replicas": 1}},
                )
            ]
            # The pod comes up: its EndpointSlice arrives by watch, the poller sees the adapter loaded.
            sl = endpoint_slice("d", ["127.0.0.1"])
            sl["ports"] = [{"name": "http", "port": backend.port}]
            api.emit(collection_path("endpointslices", NS), "ADDED", sl)
            resp = await request
            assert resp.status == 200
            assert (await resp.json())["model"] == "bot-v1"
        # Deleting the deployment by watch removes it.
        api.emit(deps, "DELETED", deployment("d"))
        await wait_until(lambda: store.get(NS, "d") is None)
    finally:
        await server.close()
        await discovery.close()
        await poller.close()
        await gateway.close()
        await kube.close()
        await backend.stop()


async def test_waker_patches_scale_at_zero_and_leaves_a_scaled_deployment_alone(api: FakeApiServer) -> None:
    kube = client_for(api)
    try:
        api.replicas["up"] = 2
        await KubernetesWaker(kube).wake(NS, "up")
        assert api.patches == []
        api.replicas["zero"] = 0
        await KubernetesWaker(kube).wake(NS, "zero")
        assert [(p[0], p[2]["spec"]) for p in api.patches] == [(scale_path(NS, "zero"), {"replicas": 1})]
        # Created a moment ago: the scale subresource answers 500 until the operator sets spec.replicas.
        api.replicas["new"] = None
        wake = asyncio.create_task(KubernetesWaker(kube, retry_delay=0.05).wake(NS, "new"))
        await asyncio.sleep(0.2)
        assert not wake.done()
        api.replicas["new"] = 0
        await wake
        assert [p[0] for p in api.patches][-1] == scale_path(NS, "new")
    finally:
        await kube.close()


async def test_kubeconfig_credentials(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                "users": [{"name": "u", "user": {"token": "test-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    kube = KubeClient(load_credentials(str(kubeconfig)))
    try:
        status, payload = await kube.request("GET", collection_path("deployments", None))
        assert status == 200
        assert payload["items"] == []
    finally:
        await kube.close()
