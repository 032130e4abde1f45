"""Building blocks for router tests: custom resources as dicts, and the router started in-process."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraserve.router.auth import KeyRing, parse_keys
from loraserve.router.gateway import Gateway, RouterConfig
from loraserve.router.hold import NullWaker, Waker
from loraserve.router.httpserver import BodyBudget, Limits, Server
from loraserve.router.topology import DeploymentKey, Replica, TopologyStore, build_deployments

NS = "default"


def deployment(
    name: str,
    base: str | None = "hf://org/tiny-llama",
    *,
    ns: str = NS,
    addons: bool = True,
    model_version: str | None = None,
    annotations: Mapping[str, str] | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if model_version is not None:
        spec["modelVersion"] = model_version
    else:
        spec["baseModel"] = base
        spec["enableAddons"] = addons
    if replicas is not None:
        spec["replicas"] = replicas
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "serving.loraserve.dev/v1alpha1", "kind": "Deployment", "metadata": meta, "spec": spec}


def addon(name: str, on: str, targets: Sequence[tuple[str, int]], *, ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "LoraAddon",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"deployment": on, "targets": [{"modelVersion": mv, "weight": w} for mv, w in targets]},
    }


def model_version(name: str, version: str, *, ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "version": version,
            "baseModel": {"name": "hf://org/tiny-llama", "revision": "abc"},
            "adapter": {"uri": f"s3://bucket/{name}"},
        },
    }


def endpoint_slice(
    service: str, addresses: Iterable[str], *, ns: str = NS, ready: bool | None = True
) -> dict[str, Any]:
    conditions: dict[str, Any] = {} if ready is None else {"ready": ready}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-abcde", "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": conditions} for a in addresses],
    }


def keys_yaml(entries: Sequence[Mapping[str, Any]]) -> str:
    """A keys file; each entry gives `key` in clear, stored as its sha256."""
    import yaml

    out = []
    for e in entries:
        item = {k: v for k, v in e.items() if k != "key"}
        item["sha256"] = hashlib.sha256(str(e["key"]).encode()).hexdigest()
        out.append(item)
    return yaml.safe_dump(out)


class RecordingWaker:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def wake(self, namespace: str, name: str) -> None:
        self.calls.append((namespace, name))


@dataclass
class Harness:
    store: TopologyStore
    gateway: Gateway
    server: Server
    port: int
    resources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    def set(
        self,
        resources: Iterable[Mapping[str, Any]],
        replicas: Mapping[DeploymentKey, Sequence[str]] | None = None,
        loaded: Mapping[str, Iterable[str]] | None = None,
    ) -> list[Replica]:
        """Replace the topology: CRs, ready replica URLs per deployment, adapters loaded per replica URL."""
        res = list(resources)
        views = build_deployments(
            [r for r in res if r["kind"] == "Deployment"],
            [r for r in res if r["kind"] == "LoraAddon"],
            [r for r in res if r["kind"] == "ModelVersion"],
            [],
            extra_replicas=replicas or {},
        )
        new = self.store.replace(views)
        for _, replica in self.store.replicas():
            if loaded is not None and replica.url in loaded:
                self.store.set_loaded(replica, frozenset(loaded[replica.url]))
        return new

    async def close(self) -> None:
        await self.server.close()
        await self.gateway.close()


async def start_router(
    *,
    keys: Sequence[Mapping[str, Any]] | None = None,
    config: RouterConfig | None = None,
    waker: Waker | None = None,
    key_concurrency: int | None = None,
    limits: Limits | None = None,
    budget: BodyBudget | None = None,
) -> Harness:
    store = TopologyStore()
    ring = KeyRing(parse_keys(keys_yaml(keys)), default_max_concurrent=key_concurrency) if keys is not None else None
    gateway = Gateway(store, waker or NullWaker(), keys=ring, config=config or RouterConfig())
    server = Server(gateway, limits or Limits(max_body=gateway.config.max_body_bytes), budget)
    port = await server.start("127.0.0.1", 0)
    return Harness(store, gateway, server, port)


async def wait_until(predicate: Callable[[], object], what: str = "condition", seconds: float = 60.0) -> None:
    """Poll `predicate` until true; a bounded wait (a safety net, not a timing assertion)."""
    step = 0.005
    for _ in range(int(seconds / step)):
        if predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"gave up waiting for {what}")
