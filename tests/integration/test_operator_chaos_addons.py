"""The operator SIGKILLed at random points during at least 50 create/update/delete operations on Deployments
(with running replicas) and LoraAddons: once it runs again everything converges, every addon is READY with
exactly its versions loaded on every ready replica of its Deployment, nothing is left loaded or owned for a CR
that is gone, and no adapter was ever loaded twice on a replica.

The replicas are real pods on a node of this test (scheduled by the real scheduler, reported Ready by the node
agent) whose IPs are loopback addresses (the node's podCIDR is in 127.0.0.0/8, which Linux routes to `lo`),
where a fake of vLLM's admin API and of the adapter fetcher answers, one per pod IP, and records every call.
Real vLLM on CPU loads an adapter in seconds: too slow for this many operations. The fake answers as vLLM 0.32
does (400 for a name already loaded, 404 for an adapter directory that was never fetched), and forgets
everything when its pod is deleted. Seeded: LORASERVE_CHAOS_SEED replays the operations and kill points."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from aiohttp import web
from kubernetes import client, config, watch

from loraserve.api.naming import LABEL_DEPLOYMENT, MODEL_SERVER_PORT
from loraserve.local.cluster import LocalCluster
from loraserve.local.nodeagent import POOL_TAINT, register_node
from loraserve.resources.settings import ManifestSettings
from tests.integration.conftest import Operator, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
OPERATIONS = 60
API = "serving.loraserve.dev/v1alpha1"
BASE = "hf://org/tiny-llama"
POOL = "chaos-loopback"  # this test's node: its own pool, region and taint, so no other test's pods land there
NODE = "chaos-lo-0"
POD_CIDR = "127.77.0.0/24"
# The node agent hands out addresses in order from the CIDR; the fake listens on the first ones before any pod
# exists, as a replica's server is up before its pod reports Ready.
ADDRESSES = 120
FETCHER_PORT = ManifestSettings().fetcher_port
VERSIONS = {f"chaos-mv-{i}": f"v{i}" for i in range(1, 5)}


@dataclass
class Replica:
    """What one fake model-server pod holds, and every adapter call it got: (time, call, name, HTTP status)."""

    ip: str
    pod: str | None = None
    deployment: str | None = None
    alive: bool = True
    files: set[str] = field(default_factory=set)
    loaded: set[str] = field(default_factory=set)
    loading: set[str] = field(default_factory=set)
    calls: list[tuple[float, str, str, int]] = field(default_factory=list)


class FakeModelServers:
    """vLLM's admin API on :8000 and the fetcher on :8001 of every address the test's node gives its pods."""

    def __init__(self, seed: int, addresses: list[str]) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.replicas = {ip: Replica(ip) for ip in addresses}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)

    async def _start(self) -> None:
        for port, app in ((MODEL_SERVER_PORT, self._vllm()), (FETCHER_PORT, self._fetcher())):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self.runners.append(runner)
            for ip in self.replicas:
                await web.TCPSite(runner, ip, port).start()

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def pod_seen(self, ip: str, pod: str, deployment: str | None) -> None:
        with self.lock:
            replica = self.replicas.get(ip)
            assert replica is not None, f"pod {pod} got {ip}, beyond the {ADDRESSES} addresses the fake serves"
            assert replica.pod in (None, pod), f"{ip} given to {pod} after {replica.pod}: an address was reused"
            replica.pod, replica.deployment = pod, deployment

    def pod_gone(self, ip: str) -> None:
        """The pod's processes end: vLLM forgets every adapter, its address answers nothing any more."""
        with self.lock:
            replica = self.replicas[ip]
            replica.alive = False
            replica.loaded.clear()
            replica.files.clear()

    # -- the fake servers -----------------------------------------------------------------------------------
    def _replica(self, request: web.Request) -> Replica:
        ip = request.transport.get_extra_info("sockname")[0] if request.transport else ""
        replica = self.replicas[ip]
        if not replica.alive:
            if request.transport is not None:
                request.transport.close()  # a dead pod: the connection drops
            raise web.HTTPServiceUnavailable()
        return replica

    def _vllm(self) -> web.Application:
        def error(status: int, kind: str, message: str) -> web.Response:
            body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
            return web.json_response(body, status=status)

        async def models(request: web.Request) -> web.Response:
            replica = self._replica(request)
            with self.lock:
                names = sorted(replica.loaded)
            data = [{"id": "tiny-llama", "object": "model", "parent": None}]
            data += [{"id": n, "object": "model", "parent": "tiny-llama"} for n in names]
            return web.json_response({"object": "list", "data": data})

        async def load(request: web.Request) -> web.Response:
            replica = self._replica(request)
            body = await request.json()
            name, path = body["lora_name"], body["lora_path"]
            with self.lock:
                if name in replica.loaded or name in replica.loading:
                    replica.calls.append((time.time(), "load", name, 400))
                    message = (
                        f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                        "place, set 'load_inplace' to True."
                    )
                    return error(400, "InvalidUserInput", message)
                if path != f"/adapters/{name}" or name not in replica.files:
                    replica.calls.append((time.time(), "load", name, 404))
                    return error(404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}")
                replica.loading.add(name)
                delay = self.rng.uniform(0.0, 0.3)
            await asyncio.sleep(delay)  # vLLM reads the weights and copies them into a slot before answering
            with self.lock:
                replica.loading.discard(name)
                if not replica.alive:
                    raise web.HTTPServiceUnavailable()
                replica.loaded.add(name)
                replica.calls.append((time.time(), "load", name, 200))
            return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

        async def unload(request: web.Request) -> web.Response:
            replica = self._replica(request)
            name = (await request.json())["lora_name"]
            with self.lock:
                if name not in replica.loaded:
                    replica.calls.append((time.time(), "unload", name, 404))
                    return error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
                replica.loaded.discard(name)
                replica.calls.append((time.time(), "unload", name, 200))
            return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

        async def plain(request: web.Request) -> web.Response:
            self._replica(request)
            return web.Response(text="")

        app = web.Application()
        app.add_routes(
            [
                web.get("/v1/models", models),
                web.post("/v1/load_lora_adapter", load),
                web.post("/v1/unload_lora_adapter", unload),
                web.get("/health", plain),
                web.get("/metrics", plain),
            ]
        )
        return app

    def _fetcher(self) -> web.Application:
        async def fetch(request: web.Request) -> web.Response:
            replica = self._replica(request)
            body = await request.json()
            with self.lock:
                replica.files.add(body["name"])
                replica.calls.append((time.time(), "fetch", body["name"], 200))
            return web.json_response({"path": f"/adapters/{body['name']}", "cached": False})

        async def remove(request: web.Request) -> web.Response:
            replica = self._replica(request)
            name = request.match_info["name"]
            with self.lock:
                replica.files.discard(name)
                replica.calls.append((time.time(), "remove", name, 200))
            return web.json_response({"removed": name})

        app = web.Application()
        app.add_routes([web.post("/fetch", fetch), web.delete("/adapters/{name}", remove)])
        return app

    def leave_loaded(self, ip: str, names: set[str]) -> None:
        """Adapters on a replica that no call of the operator's put there in this run (a killed one's)."""
        with self.lock:
            self.replicas[ip].loaded |= names
            self.replicas[ip].files |= names

    # -- what the test reads --------------------------------------------------------------------------------
    def loaded(self, ip: str) -> set[str] | None:
        with self.lock:
            replica = self.replicas.get(ip)
            return set(replica.loaded) if replica is not None and replica.alive else None

    def alive_with_adapters(self) -> dict[str, set[str]]:
        with self.lock:
            return {ip: set(r.loaded) for ip, r in self.replicas.items() if r.alive and r.loaded}

    def loaded_twice(self) -> list[str]:
        """Every load of a name the replica held (or was loading) at that moment, and every name loaded again
        with no unload between, with the calls for that name as evidence."""
        found = []
        with self.lock:
            for replica in self.replicas.values():
                held: set[str] = set()
                for at, call, name, code in replica.calls:
                    evidence = f"{replica.pod} ({replica.ip}) {name} at {at:.3f}: " + ", ".join(
                        f"{c}={s}@{t:.3f}" for t, c, n, s in replica.calls if n == name
                    )
                    if call == "load" and code == 400:
                        found.append("load answered 'already loaded': " + evidence)
                    elif call == "load" and code == 200:
                        if name in held:
                            found.append("loaded again without an unload: " + evidence)
                        held.add(name)
                    elif call == "unload" and code == 200:
                        held.discard(name)
        return found

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(f"{call}:{code}" for r in self.replicas.values() for _, call, _, code in r.calls)


def follow_pods(api: client.ApiClient, ns: str, servers: FakeModelServers, stop: threading.Event) -> None:
    """Tell the fake which pod each address belongs to, and end a pod's server the moment the pod is gone."""
    core: Any = client.CoreV1Api(api)
    known: dict[str, str] = {}  # pod uid -> IP

    def seen(kind: str, pod: Any) -> None:
        uid, ip = pod.metadata.uid, (pod.status.pod_ip if pod.status else None)
        if kind == "DELETED" or pod.metadata.deletion_timestamp is not None:
            if uid in known:
                servers.pod_gone(known.pop(uid))
        elif ip and uid not in known:
            known[uid] = ip
            servers.pod_seen(ip, pod.metadata.name, (pod.metadata.labels or {}).get(LABEL_DEPLOYMENT))

    while not stop.is_set():
        try:
            pods = core.list_namespaced_pod(ns)
            listed = {p.metadata.uid for p in pods.items}
            for uid in set(known) - listed:
                servers.pod_gone(known.pop(uid))
            for pod in pods.items:
                seen("ADDED", pod)
            watcher: Any = watch.Watch()  # type: ignore[no-untyped-call]
            for event in watcher.stream(
                core.list_namespaced_pod, ns, resource_version=pods.metadata.resource_version, timeout_seconds=5
            ):
                seen(event["type"], event["object"])
                if stop.is_set():
                    return
        except Exception:  # an expired watch or an apiserver hiccup: list again
            stop.wait(0.5)


# -- the CRs ----------------------------------------------------------------------------------------------
def deployment(name: str, step: int, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "baseModel": BASE,
            "enableAddons": True,
            "minReplicas": replicas,
            "maxReplicas": 2,
            "region": POOL,
            "tolerations": [{"key": POOL_TAINT, "operator": "Equal", "value": POOL, "effect": "NoSchedule"}],
            "extraArgs": [f"--seed={step}"],
        },
    }


def model_version(name: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {
            "version": version,
            "baseModel": {"name": BASE, "revision": "0" * 40},
            "adapter": {"uri": f"s3://chaos-adapters/{version}", "rank": 8},
        },
    }


def targets(versions: list[str]) -> list[dict[str, Any]]:
    weights = [100] if len(versions) == 1 else [70, 30]
    return [{"modelVersion": v, "weight": w} for v, w in zip(versions, weights, strict=True)]


def addon(name: str, deployment_name: str, versions: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LoraAddon",
        "metadata": {"name": name},
        "spec": {"deployment": deployment_name, "targets": targets(versions)},
    }


def served(addon_name: str, versions: list[str]) -> set[str]:
    return {f"{addon_name}-{VERSIONS[v]}" for v in versions}


def listed(cluster: LocalCluster, ns: str, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(cluster.kubectl("get", kind, "-n", ns, "-o", "json").stdout)["items"]
    return items


@dataclass
class World:
    """What the test asked for: Deployments (name -> replicas) and addons (name -> (deployment, versions))."""

    deployments: dict[str, int] = field(default_factory=dict)
    addons: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    ever: dict[str, set[str]] = field(default_factory=dict)  # addon -> every served name it was ever given


def converged(cluster: LocalCluster, ns: str, world: World, servers: FakeModelServers) -> str | None:
    """None when the cluster and the fake replicas are as `world` says, else what is still off."""
    lsds = {c["metadata"]["name"]: c for c in listed(cluster, ns, "lsd")}
    loras = {c["metadata"]["name"]: c for c in listed(cluster, ns, "lora")}
    if set(lsds) != set(world.deployments) or set(loras) != set(world.addons):
        return f"CRs {sorted(lsds)} {sorted(loras)} != {sorted(world.deployments)} {sorted(world.addons)}"
    for name, cr in {**lsds, **loras}.items():
        if (cr.get("status") or {}).get("observedGeneration") != cr["metadata"]["generation"]:
            return f"{name}: status not caught up"
    children = {d["metadata"]["name"]: d for d in listed(cluster, ns, "deployment.apps")}
    for name, replicas in world.deployments.items():
        child = children.get(name)
        st = (child or {}).get("status") or {}
        if child is None or st.get("observedGeneration") != child["metadata"]["generation"]:
            return f"{name}: child not caught up"
        if not (st.get("updatedReplicas") == st.get("readyReplicas") == st.get("replicas", 0) >= replicas):
            return f"{name}: rollout not done ({st})"
    ready: dict[str, list[str]] = {name: [] for name in world.deployments}
    for pod in listed(cluster, ns, "pod"):
        owner = (pod["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT, "")
        if owner not in ready or pod["metadata"].get("deletionTimestamp"):
            return f"pod {pod['metadata']['name']} of {owner or 'nothing'} still there"
        conditions = (pod.get("status") or {}).get("conditions") or []
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return f"pod {pod['metadata']['name']} not ready"
        ready[owner].append(pod["status"]["podIP"])
    warm: dict[str, set[str]] = {name: set() for name in world.deployments}
    wanted: dict[str, set[str]] = {name: set() for name in world.deployments}
    for name, (on, versions) in world.addons.items():
        st = loras[name].get("status") or {}
        if st.get("state") != "READY":
            return f"addon {name}: {st.get('state')} {st.get('message')}"
        if set(st.get("servedNames") or []) != served(name, versions):
            return f"addon {name} serves {st.get('servedNames')}, not {sorted(served(name, versions))}"
        wanted[on] |= served(name, versions)
        warm[on] |= set(st.get("retired") or {})
    for name, ips in ready.items():
        for ip in ips:
            loaded = servers.loaded(ip)
            if loaded is None:
                return f"{name}: ready replica {ip} has no server"
            if not wanted[name] <= loaded <= wanted[name] | warm[name]:
                return f"{name}: replica {ip} holds {sorted(loaded)}, wanted {sorted(wanted[name])} (+warm)"
    everywhere = {ip for ips in ready.values() for ip in ips}
    for ip, loaded in servers.alive_with_adapters().items():
        if ip not in everywhere:
            return f"{ip} holds {sorted(loaded)} but is no ready replica of a live Deployment"
    return None


@contextlib.contextmanager
def loopback_replicas(cluster: LocalCluster, ns: str, seed: int) -> Iterator[FakeModelServers]:
    """The test's node, its agent, and the fake model servers on its pods' addresses, with the ModelVersions
    applied; all removed afterwards."""
    api = config.new_client_from_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    register_node(client.CoreV1Api(api), NODE, "NVIDIA_A100_80GB", 64, POOL, POD_CIDR, POOL)
    network = ipaddress.ip_network(POD_CIDR)
    servers = FakeModelServers(seed, [str(network[i]) for i in range(1, ADDRESSES + 1)])
    servers.start()
    agent = node_agent(cluster)
    stop = threading.Event()
    follower = threading.Thread(target=follow_pods, args=(api, ns, servers, stop), daemon=True)
    follower.start()
    try:
        cluster.kubectl(
            "apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all([model_version(n, v) for n, v in VERSIONS.items()])
        )
        yield servers
    finally:
        stop.set()
        agent.terminate()
        agent.wait(30)
        follower.join(10)
        servers.stop()
        client.CoreV1Api(api).delete_node(NODE)


def test_operator_killed_at_random_points_converges_with_addons(
    cluster: LocalCluster, sole_operator: Operator, namespace: str
) -> None:
    ns = namespace
    seed = int(os.environ.get("LORASERVE_CHAOS_SEED", "13"))
    print(f"chaos seed {seed}")
    rng = random.Random(seed)
    op = sole_operator
    world = World()
    kills = made_deployments = made_addons = 0
    done: Counter[str] = Counter()
    started = time.monotonic()
    with loopback_replicas(cluster, ns, seed) as servers:
        op.start()
        for step in range(OPERATIONS):
            roll = rng.random()
            if not world.deployments or (len(world.deployments) < 3 and roll < 0.15):
                name = f"cd-{made_deployments}"  # names never reused: a deleted one may still be finalizing
                made_deployments += 1
                world.deployments[name] = 1
                cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(deployment(name, step, 1)))
                done["create Deployment"] += 1
            elif roll < 0.25:
                name = rng.choice(sorted(world.deployments))
                # A new template (a rollout: a fresh replica that has nothing loaded) or another replica count.
                replicas = world.deployments[name] if rng.random() < 0.5 else 3 - world.deployments[name]
                world.deployments[name] = replicas
                spec = deployment(name, step, replicas)["spec"]
                patch = json.dumps({"spec": {"minReplicas": replicas, "extraArgs": spec["extraArgs"]}})
                cluster.kubectl("patch", "lsd", name, "-n", ns, "--type=merge", "-p", patch)
                done["update Deployment"] += 1
            elif roll < 0.32 and len(world.deployments) > 1:
                name = rng.choice(sorted(world.deployments))
                mine = sorted(a for a, (on, _) in world.addons.items() if on == name)
                if mine:
                    cluster.kubectl("delete", "lora", *mine, "-n", ns, "--wait=false")
                cluster.kubectl("delete", "lsd", name, "-n", ns, "--wait=false")
                del world.deployments[name]
                for a in mine:
                    del world.addons[a]
                done["delete Deployment"] += 1
                done["delete addon"] += len(mine)
            elif (roll < 0.6 and len(world.addons) < 8) or not world.addons:
                name = f"ad-{made_addons}"
                made_addons += 1
                on = rng.choice(sorted(world.deployments))
                versions = rng.sample(sorted(VERSIONS), rng.choice([1, 2]))
                world.addons[name] = (on, versions)
                world.ever[name] = served(name, versions)
                cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(addon(name, on, versions)))
                done["create addon"] += 1
            elif roll < 0.85:
                name = rng.choice(sorted(world.addons))
                on, _ = world.addons[name]
                if len(world.deployments) > 1 and rng.random() < 0.35:
                    # Moved to another Deployment: the replicas it leaves must unload it.
                    on = rng.choice(sorted(set(world.deployments) - {on}))
                    done["move addon"] += 1
                versions = rng.sample(sorted(VERSIONS), rng.choice([1, 2]))
                world.addons[name] = (on, versions)
                world.ever[name] |= served(name, versions)
                patch = json.dumps({"spec": {"deployment": on, "targets": targets(versions)}})
                cluster.kubectl("patch", "lora", name, "-n", ns, "--type=merge", "-p", patch)
                done["re-target addon"] += 1
            else:
                name = rng.choice(sorted(world.addons))
                cluster.kubectl("delete", "lora", name, "-n", ns, "--wait=false")
                del world.addons[name]
                done["delete addon"] += 1
            if rng.random() < 0.3:
                # Somewhere in the middle of whatever the operator is doing for the last few operations.
                time.sleep(rng.uniform(0.0, 2.0))
                op.kill()  # SIGKILL: no cleanup, no finalizer removal, no status write, loads cut off mid-way
                kills += 1
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0.0, 1.0))
                    op.start()
            elif rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 1.0))  # let some operations finish before the next one
            if op.proc is None and rng.random() < 0.5:
                op.start()
        if op.proc is None:
            op.start()
        operated = time.monotonic()
        problem: list[str | None] = [None]

        def settled() -> bool:
            problem[0] = converged(cluster, ns, world, servers)
            return problem[0] is None

        wait_for(settled, timeout=300, interval=2, message=lambda: f"convergence (seed {seed}): {problem[0]}")
        took = time.monotonic() - operated
        # Settled for good: a few more rounds change nothing (no late load, unload or double load).
        time.sleep(8)
        assert converged(cluster, ns, world, servers) is None
        twice = servers.loaded_twice()
        leftovers = leftover_children(cluster, ns)
        op.kill()
    counts = servers.counts()
    print(
        f"chaos seed {seed}: {OPERATIONS} operations, {kills} SIGKILLs, {made_deployments} Deployments and "
        f"{made_addons} addons created, {len(world.deployments)} and {len(world.addons)} left ({dict(done)}); "
        f"converged {took:.0f} s after the last operation ({time.monotonic() - started:.0f} s in all); adapter calls "
        f"{dict(sorted(counts.items()))}"
    )
    assert kills >= 10
    assert not twice, f"seed {seed}: adapters loaded twice:\n" + "\n".join(twice)
    assert not leftovers, f"seed {seed}: left over: {leftovers}"
    # Versions kept warm after a re-target are ones the addon really had.
    for name, (_, versions) in world.addons.items():
        retired = set(
            (
                (
                    json.loads(cluster.kubectl("get", "lora", name, "-n", ns, "-o", "json").stdout).get("status") or {}
                ).get("retired")
            )
            or {}
        )
        assert retired <= world.ever[name] - served(name, versions), f"{name} keeps {retired} warm"


def test_adapters_no_addon_owns_are_unloaded_when_the_operator_starts(
    cluster: LocalCluster, sole_operator: Operator, namespace: str
) -> None:
    """An operator killed between loading an adapter and writing down where (the addon's status), or before
    unloading an addon that moved or was deleted, leaves adapters nobody owns on a replica, each taking a GPU
    slot. The next operator to start unloads them, and leaves every addon's own in place."""
    ns, op = namespace, sole_operator
    with loopback_replicas(cluster, ns, 7) as servers:
        docs = [deployment("sw-a", 0, 1), deployment("sw-b", 0, 1)]
        docs += [addon("keep", "sw-a", ["chaos-mv-1"]), addon("other", "sw-b", ["chaos-mv-2"])]
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))
        op.start()

        def ready_addons() -> bool:
            return all((c.get("status") or {}).get("state") == "READY" for c in listed(cluster, ns, "lora"))

        wait_for(ready_addons, timeout=120, message="both addons READY")
        ips = {
            (p["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT): p["status"]["podIP"]
            for p in listed(cluster, ns, "pod")
        }
        assert servers.loaded(ips["sw-a"]) == {"keep-v1"}
        assert servers.loaded(ips["sw-b"]) == {"other-v2"}
        op.kill()
        # What a killed operator left on sw-a: an addon since deleted, and one since moved to sw-b.
        servers.leave_loaded(ips["sw-a"], {"gone-v3", "other-v2"})
        op.start()
        wait_for(
            lambda: servers.loaded(ips["sw-a"]) == {"keep-v1"},
            timeout=60,
            message=lambda: f"sw-a's replica to hold only keep-v1, not {sorted(servers.loaded(ips['sw-a']) or [])}",
        )
        time.sleep(3)  # and nothing else moves afterwards
        assert servers.loaded(ips["sw-a"]) == {"keep-v1"}
        assert servers.loaded(ips["sw-b"]) == {"other-v2"}
        assert ready_addons()
        op.kill()


def leftover_children(cluster: LocalCluster, ns: str) -> list[str]:
    """Objects in the namespace owned by a loraserve CR that no longer exists."""
    uids = {c["metadata"]["uid"] for kind in ("lsd", "lora", "mv") for c in listed(cluster, ns, kind)}
    left = []
    for kind in ("deployment.apps", "replicaset.apps", "pod", "service", "secret", "configmap"):
        for obj in listed(cluster, ns, kind):
            for ref in obj["metadata"].get("ownerReferences") or []:
                if ref["apiVersion"].startswith("serving.loraserve.dev/") and ref["uid"] not in uids:
                    left.append(f"{kind}/{obj['metadata']['name']} of {ref['kind']} {ref['name']}")
    return left


def node_agent(cluster: LocalCluster) -> subprocess.Popen[bytes]:
    """The node agent of the test's pool: pods bound to its node are reported Running and Ready."""
    return subprocess.Popen(
        [sys.executable, "-m", "loraserve.local.nodeagent", "--kubeconfig", str(cluster.kubeconfig), "--pool", POOL],
        stdout=open(cluster.workdir / "logs" / "nodeagent-chaos.log", "wb"),
        stderr=subprocess.STDOUT,
    )
