"""Where the topology comes from: a Kubernetes watch, or a static YAML file; and the adapter poller.

Both sources keep the raw objects and rebuild the view with the pure `topology.build_deployments` on any
change (coalesced to one rebuild per loop turn), then `TopologyStore.replace` it. New replicas are polled
for their loaded adapters at once; every replica is polled again every `interval` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from loraserve.api.common import GROUP, VERSION
from loraserve.router.kubeapi import KubeClient
from loraserve.router.topology import (
    SERVICE_NAME_LABEL,
    DeploymentKey,
    Replica,
    TopologyStore,
    build_deployments,
    loaded_adapters_from_models,
)
from loraserve.router.upstream import UpstreamPool, fetch
from loraserve.tokens import ModelServerTokens

log = logging.getLogger(__name__)

KINDS = ("deployments", "loraaddons", "modelversions", "endpointslices")


def collection_path(kind: str, namespace: str | None) -> str:
    group = f"/apis/{GROUP}/{VERSION}" if kind != "endpointslices" else "/apis/discovery.k8s.io/v1"
    return f"{group}/namespaces/{namespace}/{kind}" if namespace else f"{group}/{kind}"


class AdapterPoller:
    """Keeps each replica's set of loaded adapters current from its GET /v1/models."""

    def __init__(
        self,
        store: TopologyStore,
        interval: float = 2.0,
        timeout: float = 2.0,
        tokens: ModelServerTokens | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens or ModelServerTokens()
        self.interval = interval
        self.timeout = timeout
        self.pool = UpstreamPool(connect_timeout=timeout, max_idle_per_host=1)
        self._busy: set[Replica] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.pool.close()

    def poll_now(self, replica: Replica) -> None:
        if replica in self._busy:
            return
        task = asyncio.get_running_loop().create_task(self.poll(replica))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while True:
            for _, replica in self.store.replicas():
                self.poll_now(replica)
            await asyncio.sleep(self.interval)

    async def poll(self, replica: Replica) -> None:
        self._busy.add(replica)
        try:
            auth = self.tokens.header_line(*replica.deployment)
            status, body = await fetch(
                self.pool, replica.host, replica.port, "GET", "/v1/models", time_limit=self.timeout, extra=auth
            )
            if status != 200:
                return
            loaded = loaded_adapters_from_models(json.loads(body))
            if loaded is not None:
                self.store.set_loaded(replica, loaded)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("polling %s/v1/models failed: %s", replica.url, exc)
        finally:
            self._busy.discard(replica)


class _Rebuilder:
    """Coalesces changes into one rebuild per event-loop turn."""

    def __init__(self, store: TopologyStore, poller: AdapterPoller | None) -> None:
        self.store = store
        self.poller = poller
        self._scheduled = False

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        self.apply()

    def apply(self) -> None:
        new = self.store.replace(self.views())
        if self.poller is not None:
            for replica in new:
                self.poller.poll_now(replica)

    def views(self) -> Mapping[DeploymentKey, Any]:  # pragma: no cover - overridden
        raise NotImplementedError


class KubernetesDiscovery(_Rebuilder):
    """Watches Deployments, LoraAddons, ModelVersions and EndpointSlices in the served namespaces."""

    def __init__(
        self,
        client: KubeClient,
        store: TopologyStore,
        namespaces: Iterable[str] = (),
        poller: AdapterPoller | None = None,
    ) -> None:
        super().__init__(store, poller)
        self.client = client
        self.namespaces: list[str | None] = list(namespaces) or [None]
        # kind -> namespace scope -> objects by (namespace, name)
        self.objects: dict[str, dict[str | None, dict[tuple[str, str], dict[str, Any]]]] = {
            kind: {ns: {} for ns in self.namespaces} for kind in KINDS
        }
        self._tasks: list[asyncio.Task[None]] = []
        self.synced = asyncio.Event()
        self._listed: set[tuple[str, str | None]] = set()

    def views(self) -> Mapping[DeploymentKey, Any]:
        def objs(kind: str) -> list[dict[str, Any]]:
            return [o for scope in self.objects[kind].values() for o in scope.values()]

        return build_deployments(objs("deployments"), objs("loraaddons"), objs("modelversions"), objs("endpointslices"))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for kind in KINDS:
            for ns in self.namespaces:
                self._tasks.append(loop.create_task(self._watch(kind, ns)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self, kind: str, namespace: str | None) -> None:
        scope = self.objects[kind][namespace]

        def on_reset(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
            scope.clear()
            scope.update(objects)
            self._listed.add((kind, namespace))
            if len(self._listed) == len(KINDS) * len(self.namespaces):
                self.synced.set()
            self.schedule()

        def on_event(event: str, obj: dict[str, Any]) -> None:
            meta = obj.get("metadata") or {}
            key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            if event == "DELETED":
                scope.pop(key, None)
            else:
                scope[key] = obj
            self.schedule()

        await self.client.list_and_watch(
            collection_path(kind, namespace),
            on_reset,
            on_event,
            label_selector=SERVICE_NAME_LABEL if kind == "endpointslices" else None,
        )


class StaticDiscovery(_Rebuilder):
    """A YAML file instead of the cluster (tests, the local trial). Re-read when it changes.

    resources: [...]            # Deployment / LoraAddon / ModelVersion objects, as you would apply them
    include: [examples/x.yaml]  # more such objects from multi-document files (relative to this file)
    replicas:                   # ready model-server URLs per deployment (a cluster's EndpointSlices)
      default/llama-multi: [http://127.0.0.1:8001]
      llama-multi: [http://127.0.0.1:8002]          # namespace "default"
    """

    def __init__(
        self,
        path: Path,
        store: TopologyStore,
        namespaces: Iterable[str] = (),
        poller: AdapterPoller | None = None,
        reload_interval: float = 2.0,
    ) -> None:
        super().__init__(store, poller)
        self.path = path
        self.namespaces = set(namespaces)
        self.reload_interval = reload_interval
        self._mtime: float | None = None
        self._views: Mapping[DeploymentKey, Any] = {}
        self._task: asyncio.Task[None] | None = None

    def views(self) -> Mapping[DeploymentKey, Any]:
        return self._views

    def load(self) -> None:
        self._views = parse_static(self.path, self.namespaces)
        self._mtime = self.path.stat().st_mtime
        self.apply()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                mtime = self.path.stat().st_mtime
                if mtime != self._mtime:
                    self.load()
                    log.info("reloaded static topology %s", self.path)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                log.warning("static topology %s not reloaded: %s", self.path, exc)


def parse_static(path: Path, namespaces: set[str] | None = None) -> Mapping[DeploymentKey, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with resources / include / replicas")
    docs: list[dict[str, Any]] = [d for d in data.get("resources") or [] if isinstance(d, dict)]
    for rel in data.get("include") or []:
        for doc in yaml.safe_load_all((path.parent / str(rel)).read_text()):
            if isinstance(doc, dict):
                docs.append(doc)
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
    if namespaces:
        docs = [d for d in docs if d["metadata"]["namespace"] in namespaces]
    extra: dict[DeploymentKey, list[str]] = {}
    for name, urls in (data.get("replicas") or {}).items():
        ns, _, dep = str(name).rpartition("/")
        extra[(ns or "default", dep)] = [str(u).rstrip("/") for u in urls or []]

    def kind(k: str) -> list[dict[str, Any]]:
        return [d for d in docs if d.get("kind") == k]

    return build_deployments(kind("Deployment"), kind("LoraAddon"), kind("ModelVersion"), [], extra_replicas=extra)
