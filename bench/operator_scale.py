"""The operator at scale: N multi-LoRA Deployments with 10 LoraAddons each, on the real local control plane.

Run by hand (not a test), as root: it re-executes itself in a network namespace of its own (`unshare -n`)
where every pod IP of the fake GPU nodes (10.244.0.0/16) is a local address, so one fast fake of vLLM's admin
API and of the adapter fetcher answers for every replica:

    eval "$(bash hack/setup.sh)"          # the control-plane binaries (else they are built on first use)
    .venv/bin/python bench/operator_scale.py [--sizes 100,1000] [--idle 60] [--baseline 30] [--timeout 1800]

For each N in --sizes, on a fresh control plane (etcd, kube-apiserver, controller-manager, scheduler on
127.0.0.1; fake GPU nodes from `loraserve.local.nodeagent`, which reports every bound pod Running and Ready
with an IP from its node's podCIDR) it starts the real operator (`python -m loraserve.cli.main operator
--standalone`) and the fake (one aiohttp server on 0.0.0.0 at the vLLM and fetcher ports; each replica's
loaded adapters are kept per local address the connection came to; its /metrics is a real vLLM's, captured,
with nothing in flight). Then:

1. baseline: the apiserver's own `apiserver_request_total` over --baseline seconds before any CR exists
   (control plane, node agent and the idle operator);
2. creates 10 ModelVersions per namespace (one namespace, or --namespaces K), then N Deployments
   (minReplicas 1, enableAddons) each followed by its 10 LoraAddons (addon k of every Deployment points at
   ModelVersion k of its namespace), --concurrency requests at a time,
   and watches both kinds: per object, create->READY latency is from the create's answer to the first
   watch event with state READY; "all reconciled" is when every object is READY at once (progress every 10 s);
3. after --settle seconds and once the operator's API rate is idle (Kopf's per-object patches and Events
   drained and two 10 s windows within 15 %, or under 1 request/s; at most --quiet-max seconds),
   an idle window of --idle seconds: apiserver requests per second minus the
   baseline's rate (the operator's share), by verb and resource; the fake's requests per second by path;
   the operator's RSS and CPU (% of one core, from /proc/<pid>); and API calls per object per minute;
4. creates --singles addons one at a time (each on a READY Deployment, the next once it is READY) and
   prints their create->READY latency: what a user applying one fine-tune waits on a busy cluster;
5. stops everything and deletes the control plane's data before the next size.

It asserts nothing; goals printed beside the figures: RSS < 300 MB, idle CPU < 5 % of a core, create->READY
p99 < 2 s, idle API calls per object flat (ideally 0) as N grows. When a size does not converge within
--timeout, it says how far it got and measures the window anyway (labelled not converged). Ctrl-C stops
every process it started. Logs stay under --workdir with --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from loraserve.api.naming import LABEL_DEPLOYMENT, MODEL_SERVER_PORT, selector_labels
from loraserve.local.cluster import REPO_ROOT, LocalCluster, free_port
from loraserve.resources.settings import ManifestSettings
from loraserve.settings import OperatorSettings

NETNS_ENV = "LORASERVE_BENCH_NETNS"
POD_SUPERNET = "10.244.0.0/16"  # the node agent gives node i the pod CIDR 10.244.<i+1>.0/24
GROUP_PATH = "/apis/serving.loraserve.dev/v1alpha1"
BASE_MODEL = "hf://org/tiny-llama"
ADDONS_PER_DEPLOYMENT = 10
PODS_PER_NODE = 100  # the agent's nodes allow 110 pods
GOAL_RSS_MB, GOAL_CPU_PCT, GOAL_P99_S = 300.0, 5.0, 2.0
VLLM_METRICS_CAPTURE = REPO_ROOT / "tests" / "unit" / "data" / "vllm_metrics.txt"


def idle_vllm_metrics() -> str:
    """A real vLLM's /metrics (the unit tests' capture, some 50 KB), with nothing in flight: the operator reads
    and parses each replica's at its autoscaler looks, and that text's size is what the parse costs."""
    lines = []
    for line in VLLM_METRICS_CAPTURE.read_text().splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            line = line.rsplit(" ", 1)[0] + " 0.0"
        elif line.startswith("vllm:lora_requests_info{") and 'running_lora_adapters=""' not in line:
            continue  # a series with an adapter in flight
        lines.append(line)
    return "\n".join(lines) + "\n"


# -- the fake vLLM admin API and fetcher (a child process of its own) -------------------------------------
class FakeModelServers:
    """vLLM's admin surface and the fetcher for every replica at once: a replica is the local address the
    connection came to (each pod IP is a local address in the benchmark's network namespace)."""

    def __init__(self) -> None:
        self.loaded: dict[str, set[str]] = {}
        self.counts: Counter[str] = Counter()
        self.metrics_text = idle_vllm_metrics()

    @staticmethod
    def _replica(request: web.Request) -> str:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        return str(sock[0]) if sock else "?"

    def _count(self, request: web.Request, what: str) -> str:
        self.counts[what] += 1
        return self._replica(request)

    async def models(self, request: web.Request) -> web.Response:
        ip = self._count(request, "GET /v1/models")
        data = [{"id": "base", "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "parent": "base"} for n in sorted(self.loaded.get(ip, ()))]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        ip = self._count(request, "POST /v1/load_lora_adapter")
        name = str((await request.json())["lora_name"])
        loaded = self.loaded.setdefault(ip, set())
        if name in loaded:
            message = f"The lora adapter '{name}' has already been loaded."
            return web.json_response({"error": {"message": message, "type": "InvalidUserInput"}}, status=400)
        loaded.add(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        ip = self._count(request, "POST /v1/unload_lora_adapter")
        name = str((await request.json())["lora_name"])
        if name not in self.loaded.get(ip, set()):
            message = f"The lora adapter '{name}' cannot be found."
            return web.json_response({"error": {"message": message, "type": "NotFoundError"}}, status=404)
        self.loaded[ip].discard(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def metrics(self, request: web.Request) -> web.Response:
        self._count(request, "GET /metrics")
        return web.Response(text=self.metrics_text, content_type="text/plain")

    async def health(self, request: web.Request) -> web.Response:
        self._count(request, "GET /health")
        return web.Response()

    async def fetch(self, request: web.Request) -> web.Response:
        self._count(request, "POST /fetch")
        name = str((await request.json())["name"])
        return web.json_response({"path": f"/adapters/{name}"})

    async def forget(self, request: web.Request) -> web.Response:
        self._count(request, "DELETE /adapters/{name}")
        return web.json_response({})

    async def stats(self, _: web.Request) -> web.Response:
        adapters = sum(len(s) for s in self.loaded.values())
        return web.json_response({"counts": dict(self.counts), "replicas": len(self.loaded), "adapters": adapters})


async def serve_fake(stats_port: int) -> None:
    fake = FakeModelServers()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/load_lora_adapter", fake.load)
    app.router.add_post("/v1/unload_lora_adapter", fake.unload)
    app.router.add_get("/metrics", fake.metrics)
    app.router.add_get("/health", fake.health)
    app.router.add_post("/fetch", fake.fetch)
    app.router.add_delete("/adapters/{name}", fake.forget)
    app.router.add_get("/bench/stats", fake.stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for host, port in (
        ("0.0.0.0", MODEL_SERVER_PORT),
        ("0.0.0.0", ManifestSettings.from_env().fetcher_port),
        ("127.0.0.1", stats_port),
    ):
        await web.TCPSite(runner, host, port, backlog=1024).start()
    await asyncio.Event().wait()


# -- processes ---------------------------------------------------------------------------------------------
def enter_netns() -> None:
    """Re-execute in a new network namespace (root), with loopback up and the pod CIDRs routed to it."""
    if os.environ.get(NETNS_ENV) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "route", "add", "local", POD_SUPERNET, "dev", "lo"], check=True)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/operator_scale.py needs root (it runs in a network namespace of its own)")
    os.environ[NETNS_ENV] = "1"
    os.execvp("unshare", ["unshare", "--net", "--", sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])


@dataclass
class Stack:
    """One size's world: control plane, node agent, fake model servers, operator."""

    workdir: Path
    nodes: int
    cluster: LocalCluster = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stats_port: int = field(default_factory=free_port)

    def start(self) -> None:
        self.cluster = LocalCluster(self.workdir)
        self.cluster.start()
        logs = self.workdir / "logs"
        self._spawn(
            "fake",
            [sys.executable, str(Path(__file__).resolve()), "--serve-fake", str(self.stats_port)],
            logs / "fake.log",
        )
        node_args = [a for i in range(self.nodes) for a in ("--node", f"gpu-{i}=NVIDIA_A100_80GB:110:us-east-1")]
        self._spawn(
            "nodeagent",
            [
                sys.executable,
                "-m",
                "loraserve.local.nodeagent",
                "--kubeconfig",
                str(self.cluster.kubeconfig),
                *node_args,
            ],
            logs / "nodeagent.log",
        )
        crds = str(REPO_ROOT / "crds")
        self.cluster.kubectl("apply", "--server-side", "-f", crds)
        self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
        self._spawn(
            "operator",
            [sys.executable, "-m", "loraserve.cli.main", "operator", "--standalone"],
            logs / "operator.log",
            env=self.cluster.env(),
        )

    def _spawn(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with open(log, "ab") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
        self.cluster._check_alive()

    def stop(self) -> None:
        for name in ("operator", "nodeagent", "fake"):
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if hasattr(self, "cluster"):
            self.cluster.stop()


# -- measurements --------------------------------------------------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)] if s else float("nan")


RequestKey = tuple[str, str]  # (verb, resource[/subresource])


class Api:
    """The benchmark's own apiserver client (admin token), async."""

    def __init__(self, cluster: LocalCluster, session: aiohttp.ClientSession) -> None:
        self.server = cluster.server
        self.session = session

    async def request_counts(self) -> dict[RequestKey, float]:
        async with self.session.get(self.server + "/metrics") as resp:
            text = await resp.text()
        counts: dict[RequestKey, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "apiserver_request":
                continue
            for s in family.samples:
                if s.name == "apiserver_request_total":
                    resource = s.labels.get("resource") or "(non-resource)"
                    if s.labels.get("group"):  # deployments.apps vs our deployments.serving.loraserve.dev
                        resource += "." + s.labels["group"]
                    if s.labels.get("subresource"):
                        resource += "/" + s.labels["subresource"]
                    key = (s.labels.get("verb", "?"), resource)
                    counts[key] = counts.get(key, 0.0) + s.value
        return counts

    async def create(self, path: str, body: dict[str, Any]) -> None:
        for attempt in range(20):
            try:
                async with self.session.post(self.server + path, json=body) as resp:
                    if resp.status in (200, 201, 409):
                        return
                    text = await resp.text()
                    if resp.status != 429 and resp.status < 500:
                        raise RuntimeError(f"POST {path}: HTTP {resp.status}: {text[:500]}")
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        raise RuntimeError(f"POST {path}: gave up")

    async def items(self, path: str, selector: dict[str, str] | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())} if selector else {}
        async with self.session.get(self.server + path, params=params) as resp:
            return list((await resp.json())["items"])

    async def count(self, path: str) -> int:
        async with self.session.get(self.server + path, params={"limit": "1"}) as resp:
            body = await resp.json()
        return len(body["items"]) + int(body["metadata"].get("remainingItemCount") or 0)


ObjectKey = tuple[str, str, str]  # (kind, namespace, name)


@dataclass
class Tracker:
    """What the watches saw: when each object was created (the create's answer) and first seen READY."""

    created: dict[ObjectKey, float] = field(default_factory=dict)
    first_ready: dict[ObjectKey, float] = field(default_factory=dict)
    state: dict[ObjectKey, str] = field(default_factory=dict)
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)  # set at each first READY

    def see(self, kind: str, obj: dict[str, Any]) -> None:
        key = (kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
        state = str((obj.get("status") or {}).get("state") or "")
        self.state[key] = state
        if state == "READY" and key not in self.first_ready:
            self.first_ready[key] = time.monotonic()
            self.became_ready.set()

    def ready(self, kind: str) -> int:
        return sum(1 for key, s in self.state.items() if key[0] == kind and s == "READY")

    def latencies(self, kind: str | None = None) -> list[float]:
        return [
            self.first_ready[key] - at
            for key, at in self.created.items()
            if key in self.first_ready and (kind is None or key[0] == kind)
        ]


def _at(text: str | None) -> float | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _condition_at(obj: dict[str, Any], kind: str) -> float | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return _at(c.get("lastTransitionTime"))
    return None


# Where a Deployment's create->READY goes, by who acts (the API server's timestamps, to the second).
STAGES = (
    "operator: CR created -> child apps/v1 Deployment created",
    "controller-manager: child created -> pod created",
    "scheduler + node agent: pod created -> pod Ready",
    "operator: pod Ready -> CR Ready",
    "operator: Deployment Ready -> its addon Ready",
)


def stage_seconds(
    crs: list[dict[str, Any]], children: list[dict[str, Any]], pods: list[dict[str, Any]], addons: list[dict[str, Any]]
) -> dict[str, list[float]]:
    """Per stage (STAGES), the seconds each object spent in it (objects a stage cannot be told for are left out)."""
    by_owner: dict[tuple[str, str], dict[str, Any]] = {}
    for child in children:
        labels = child["metadata"].get("labels") or {}
        by_owner[(child["metadata"]["namespace"], labels.get(LABEL_DEPLOYMENT, ""))] = child
    first_pod: dict[tuple[str, str], dict[str, Any]] = {}
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["creationTimestamp"]), reverse=True):
        labels = pod["metadata"].get("labels") or {}
        first_pod[(pod["metadata"]["namespace"], labels.get(LABEL_DEPLOYMENT, ""))] = pod  # the earliest wins
    out: dict[str, list[float]] = {stage: [] for stage in STAGES}
    ready_at: dict[tuple[str, str], float] = {}
    for cr in crs:
        key = (cr["metadata"]["namespace"], cr["metadata"]["name"])
        made, earliest = by_owner.get(key), first_pod.get(key)
        marks = [
            _at(cr["metadata"]["creationTimestamp"]),
            _at(made["metadata"]["creationTimestamp"]) if made else None,
            _at(earliest["metadata"]["creationTimestamp"]) if earliest else None,
            _condition_at(earliest, "Ready") if earliest else None,
            _condition_at(cr, "Ready"),
        ]
        for stage, start, end in zip(STAGES, marks, marks[1:], strict=False):
            if start is not None and end is not None:
                out[stage].append(end - start)
        if marks[-1] is not None:
            ready_at[key] = marks[-1]
    for addon in addons:
        start = ready_at.get((addon["metadata"]["namespace"], (addon.get("spec") or {}).get("deployment", "")))
        end = _condition_at(addon, "Ready")
        if start is not None and end is not None:
            out[STAGES[-1]].append(max(0.0, end - start))
    return out


async def watch(api: Api, kind: str, tracker: Tracker) -> None:
    path = f"{api.server}{GROUP_PATH}/{kind}"  # every namespace
    while True:
        try:
            async with api.session.get(path) as resp:
                listed = await resp.json()
            for item in listed["items"]:
                tracker.see(kind, item)
            params = {"watch": "1", "resourceVersion": listed["metadata"]["resourceVersion"], "timeoutSeconds": "3600"}
            timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
            async with api.session.get(path, params=params, timeout=timeout) as resp:
                while line := await resp.content.readline():
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    if event["type"] != "DELETED":
                        tracker.see(kind, event["object"])
        except (aiohttp.ClientError, ValueError):
            await asyncio.sleep(1)


def model_version(k: int) -> dict[str, Any]:
    return {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": f"mv-{k}"},
        "spec": {
            "version": "v1",
            "baseModel": {"name": BASE_MODEL, "revision": "main"},
            "adapter": {"uri": f"s3://bench-adapters/a{k}", "digest": "sha256:" + f"{k:02d}" * 32, "rank": 8},
        },
    }


def deployment(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": f"d{i}"},
        "spec": {
            "baseModel": BASE_MODEL,
            "enableAddons": True,
            "maxLoras": 16,
            "maxLoraRank": 16,
            "minReplicas": 1,
            "maxReplicas": 1,
            "acceleratorType": "NVIDIA_A100_80GB",
            "acceleratorCount": 1,
        },
    }


def addon(i: int, k: int) -> dict[str, Any]:
    return {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "LoraAddon",
        "metadata": {"name": f"d{i}-a{k}"},
        "spec": {"deployment": f"d{i}", "targets": [{"modelVersion": f"mv-{k}", "weight": 100}]},
    }


async def fake_stats(session: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{port}/bench/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


def rates(after: dict[RequestKey, float], before: dict[RequestKey, float], seconds: float) -> dict[RequestKey, float]:
    return {k: (v - before.get(k, 0.0)) / seconds for k, v in after.items() if v != before.get(k, 0.0)}


# What Kopf does once per object after a burst of creates (finalizer patches, last-handled-configuration for
# Deployments, the state Events): while any of it is still draining, the rate is a backlog, not idle cost.
BACKLOG = {
    ("PATCH", "loraaddons.serving.loraserve.dev"),
    ("PATCH", "deployments.serving.loraserve.dev"),
    ("POST", "events"),
}


async def settle(api: Api, baseline_rps: float, limit: float) -> float:
    """Wait until the operator's API rate (beyond the baseline) is idle: a 10 s window with Kopf's per-object
    backlog drained (under 0.5 requests/s) and a total within 15 % of the window before, or under 1 request/s;
    at most `limit` seconds. Returns the seconds waited."""
    start = time.monotonic()
    before, at = await api.request_counts(), time.monotonic()
    previous: float | None = None
    while time.monotonic() - start < limit:
        await asyncio.sleep(10)
        now_counts, now = await api.request_counts(), time.monotonic()
        window = rates(now_counts, before, now - at)
        rate = max(0.0, sum(window.values()) - baseline_rps)
        backlog = sum(v for k, v in window.items() if k in BACKLOG)
        before, at = now_counts, now
        print(f"  settling: operator {rate:.1f} API requests/s, of which Kopf's backlog {backlog:.1f}/s", flush=True)
        steady = previous is not None and abs(rate - previous) <= 0.15 * max(previous, rate)
        if rate < 1.0 or (backlog < 0.5 and steady):
            break
        previous = rate
    return time.monotonic() - start


async def run_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    total = n * (1 + ADDONS_PER_DEPLOYMENT)
    print(f"\n=== N={n}: {n} Deployments x {ADDONS_PER_DEPLOYMENT} LoraAddons = {total} objects ===", flush=True)
    stack = Stack(workdir / f"n{n}", nodes=math.ceil(n / PODS_PER_NODE) + 1)
    result: dict[str, Any] = {"n": n, "objects": total}
    try:
        started = time.monotonic()
        await asyncio.to_thread(stack.start)
        op_pid = stack.procs["operator"].pid
        print(f"control plane, {stack.nodes} fake GPU nodes and operator up in {time.monotonic() - started:.0f}s")
        headers = {"Authorization": f"Bearer {stack.cluster.token}"}
        connector = aiohttp.TCPConnector(ssl=False, limit=args.concurrency + 8)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            api = Api(stack.cluster, session)
            await asyncio.sleep(args.settle)  # nodes registered, operator's watches started
            stack.check_alive()

            # 1. baseline: everything running, no CR yet
            c0, t0 = await api.request_counts(), time.monotonic()
            await asyncio.sleep(args.baseline)
            c1, t1 = await api.request_counts(), time.monotonic()
            baseline = rates(c1, c0, t1 - t0)
            result["baseline_rps"] = sum(baseline.values())
            print(f"baseline (no CR): {result['baseline_rps']:.1f} apiserver requests/s over {t1 - t0:.0f}s")

            # 2. create and watch
            spaces = [f"bench-{n}-{j}" for j in range(min(args.namespaces, n))]
            for ns in spaces:
                await api.create("/api/v1/namespaces", {"metadata": {"name": ns}})
                for k in range(ADDONS_PER_DEPLOYMENT):
                    await api.create(f"{GROUP_PATH}/namespaces/{ns}/modelversions", model_version(k))
            tracker = Tracker()
            watches = [asyncio.create_task(watch(api, kind, tracker)) for kind in ("deployments", "loraaddons")]
            await asyncio.sleep(1)
            sem = asyncio.Semaphore(args.concurrency)
            created: Counter[str] = Counter()

            async def make(kind: str, ns: str, body: dict[str, Any]) -> None:
                async with sem:
                    await api.create(f"{GROUP_PATH}/namespaces/{ns}/{kind}", body)
                    tracker.created[(kind, ns, body["metadata"]["name"])] = time.monotonic()
                    created[kind] += 1

            def bodies() -> list[tuple[str, str, dict[str, Any]]]:
                out = []
                for i in range(n):
                    ns = spaces[i % len(spaces)]  # Deployment i and its addons share a namespace
                    out.append(("deployments", ns, deployment(i)))
                    out += [("loraaddons", ns, addon(i, k)) for k in range(ADDONS_PER_DEPLOYMENT)]
                return out

            c_create = await api.request_counts()
            t_create = time.monotonic()
            cpu_create = proc_cpu_seconds(op_pid)
            creating = asyncio.ensure_future(asyncio.gather(*(make(kind, ns, b) for kind, ns, b in bodies())))
            converged_at: float | None = None
            last_print = 0.0
            n_addons = n * ADDONS_PER_DEPLOYMENT
            while True:
                await asyncio.sleep(0.5)
                stack.check_alive()
                if creating.done() and creating.exception() is not None:
                    raise creating.exception()  # type: ignore[misc]
                now = time.monotonic()
                ready_d, ready_a = tracker.ready("deployments"), tracker.ready("loraaddons")
                if creating.done() and ready_d == n and ready_a == n_addons:
                    converged_at = now
                    created_at = max(tracker.created.values())
                    print(
                        f"  all READY after {now - t_create:.1f}s (created in {created_at - t_create:.1f}s)", flush=True
                    )
                    break
                if now - last_print >= 10:
                    last_print = now
                    cpu = 100 * (proc_cpu_seconds(op_pid) - cpu_create) / (now - t_create)
                    print(
                        f"  {now - t_create:6.0f}s created {created['deployments']}/{n} deployments, "
                        f"{created['loraaddons']}/{n_addons} addons; READY {ready_d}/{n} deployments, "
                        f"{ready_a}/{n_addons} addons; operator RSS {proc_rss_mb(op_pid):.0f} MB, "
                        f"CPU {cpu:.0f}% of a core since the first create",
                        flush=True,
                    )
                if now - t_create > args.timeout:
                    states = Counter(s or "(none)" for key, s in tracker.state.items() if key[0] == "loraaddons")
                    print(
                        f"  NOT converged after {args.timeout:.0f}s: READY {ready_d}/{n} deployments, "
                        f"{ready_a}/{n_addons} addons (addon states {dict(states)}); measuring anyway",
                        flush=True,
                    )
                    break
            if not creating.done():
                creating.cancel()
            c_converged = await api.request_counts()
            model_servers = {k: v for k, v in selector_labels("x").items() if k != LABEL_DEPLOYMENT}
            stages = stage_seconds(
                await api.items(f"{GROUP_PATH}/deployments"),
                await api.items("/apis/apps/v1/deployments", model_servers),
                await api.items("/api/v1/pods", model_servers),
                await api.items(f"{GROUP_PATH}/loraaddons"),
            )
            result["stages"] = {stage: (pct(v, 0.5), pct(v, 0.99), len(v)) for stage, v in stages.items()}
            for task in watches:
                task.cancel()
            result["converged"] = converged_at is not None
            result["converge_s"] = (converged_at or time.monotonic()) - t_create
            for kind in ("deployments", "loraaddons", None):
                lat = tracker.latencies(kind)
                result[f"lat_{kind or 'all'}"] = (pct(lat, 0.5), pct(lat, 0.99), max(lat, default=float("nan")))
            # requests during creation and convergence beyond the baseline and the benchmark's own
            conv_s = time.monotonic() - t_create
            own = sum(created.values()) + 2 * 2  # the creates; each watch's list + watch
            extra = sum(c_converged.values()) - sum(c_create.values()) - result["baseline_rps"] * conv_s - own
            result["converge_calls_per_object"] = extra / total
            during = {k: (v - c_create.get(k, 0.0)) / total for k, v in c_converged.items()}
            result["converge_top"] = sorted(during.items(), key=lambda kv: -kv[1])[: args.top + 4]

            # 3. idle window, once the API rate has settled (Kopf's backlog of finalizer and diffbase patches,
            # Events and status writes after a burst of creates is convergence, not idle cost)
            await asyncio.sleep(args.settle)
            result["settled_s"] = await settle(api, result["baseline_rps"], args.quiet_max)
            result["settle_wait"] = args.settle
            f0, c0, cpu0, t0 = (
                await fake_stats(session, stack.stats_port),
                await api.request_counts(),
                proc_cpu_seconds(op_pid),
                time.monotonic(),
            )
            await asyncio.sleep(args.idle)
            f1, c1, cpu1, t1 = (
                await fake_stats(session, stack.stats_port),
                await api.request_counts(),
                proc_cpu_seconds(op_pid),
                time.monotonic(),
            )
            stack.check_alive()
            idle_s = t1 - t0
            idle = rates(c1, c0, idle_s)
            keys = set(idle) | set(baseline)
            share = {k: idle.get(k, 0.0) - baseline.get(k, 0.0) for k in keys}
            result["idle_rps"] = sum(idle.values())
            result["operator_rps"] = sum(share.values())
            result["top"] = sorted(share.items(), key=lambda kv: -kv[1])[: args.top]
            fake_counts = {k: (v - f0["counts"].get(k, 0)) / idle_s for k, v in f1["counts"].items()}
            result["fake_rps"] = sum(fake_counts.values())
            result["fake_top"] = sorted(((k, v) for k, v in fake_counts.items() if v), key=lambda kv: -kv[1])
            result["fake_loaded"] = (f1["replicas"], f1["adapters"])
            result["rss_mb"] = proc_rss_mb(op_pid)
            result["cpu_pct"] = 100 * (cpu1 - cpu0) / idle_s
            result["idle_s"] = idle_s

            # 4. one change at a time on the converged, idle operator: a new addon on a READY Deployment,
            # create->READY (what a user applying one fine-tune waits), --singles of them in turn
            single = Tracker()
            watching = asyncio.create_task(watch(api, "loraaddons", single))
            await asyncio.sleep(2)
            for j in range(args.singles):
                i = (j * 7919) % n  # spread over the Deployments
                ns = spaces[i % len(spaces)]
                body = addon(i, j % ADDONS_PER_DEPLOYMENT)
                body["metadata"]["name"] = f"single-{j}"
                await api.create(f"{GROUP_PATH}/namespaces/{ns}/loraaddons", body)
                key = ("loraaddons", ns, body["metadata"]["name"])
                single.created[key] = time.monotonic()
                deadline = time.monotonic() + 60
                while key not in single.first_ready and time.monotonic() < deadline:
                    single.became_ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(single.became_ready.wait(), max(0.0, deadline - time.monotonic()))
            watching.cancel()
            lat = single.latencies()
            result["single"] = (len(lat), args.singles, pct(lat, 0.5), pct(lat, 0.99), max(lat, default=float("nan")))
            print_size(result)
            return result
    finally:
        await asyncio.to_thread(stack.stop)
        if not args.keep:
            shutil.rmtree(stack.workdir, ignore_errors=True)


def yes(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_size(r: dict[str, Any]) -> None:
    n, total = r["n"], r["objects"]
    print(f"--- N={n} ({total} objects) ---")
    label = "all reconciled" if r["converged"] else "NOT converged, stopped waiting"
    print(f"time until {label}: {r['converge_s']:.1f} s after the first create")
    for kind, name in (("deployments", "Deployments"), ("loraaddons", "LoraAddons"), ("all", "all objects")):
        p50, p99, top = r[f"lat_{kind}"]
        print(f"create->READY {name:12s} p50 {p50:7.2f} s  p99 {p99:7.2f} s  max {top:7.2f} s")
    print("where a Deployment's create->READY went (the API server's timestamps, to the second):")
    for stage, (p50, p99, count) in r["stages"].items():
        print(f"    p50 {p50:6.0f} s  p99 {p99:6.0f} s  {stage} ({count})")
    per_obj = r["operator_rps"] / total
    print(f"API rate settled {r['settled_s']:.0f} s after convergence (+{r.get('settle_wait', 0):.0f} s fixed wait)")
    print(
        f"apiserver while idle ({r['idle_s']:.0f} s): {r['idle_rps']:.1f} requests/s, baseline "
        f"{r['baseline_rps']:.1f}/s -> operator's share {r['operator_rps']:.1f}/s = {per_obj:.4f}/s per object "
        f"({60 * per_obj:.2f} per object per minute)"
    )
    for (verb, resource), rate in r["top"]:
        print(f"    {rate:8.2f}/s  {verb:6s} {resource}")
    settings = OperatorSettings.from_env()
    meter_every, resync_every = settings.autoscaler.gpu_meter_every, settings.resync_every
    shorter = "; the window is shorter than that" if r["idle_s"] < meter_every else ""
    print(
        f"    (by design: the GPU meter's status write, once per ready Deployment about every {meter_every:.0f} s, "
        f"{r['n'] / meter_every:.2f}/s here on average{shorter}; and each Deployment's resync about every "
        f"{resync_every:.0f} s, a GET of its child and its Service and a LIST of its pods, "
        f"{r['n'] / resync_every:.2f}/s each)"
    )
    print(
        f"API calls per object while creating and converging (beyond baseline and our creates): "
        f"{r['converge_calls_per_object']:.1f}"
    )
    for (verb, resource), per_object in r["converge_top"]:
        print(f"    {per_object:8.2f}  {verb:6s} {resource}")
    replicas, adapters = r["fake_loaded"]
    print(
        f"fake vLLM + fetcher while idle: {r['fake_rps']:.1f} requests/s ({replicas} replicas, {adapters} adapters "
        "loaded)"
    )
    for path, rate in r["fake_top"]:
        print(f"    {rate:8.2f}/s  {path}")
    print(
        f"operator while idle: RSS {r['rss_mb']:.0f} MB (goal < {GOAL_RSS_MB:.0f}: {yes(r['rss_mb'] < GOAL_RSS_MB)}), "
        f"CPU {r['cpu_pct']:.1f} % of a core (goal < {GOAL_CPU_PCT:.0f}: {yes(r['cpu_pct'] < GOAL_CPU_PCT)})"
    )
    p99 = r["lat_all"][1]
    print(f"create->READY p99 {p99:.2f} s in the burst of creates (goal < {GOAL_P99_S:.0f} s: {yes(p99 < GOAL_P99_S)})")
    ready, asked, s50, s99, smax = r["single"]
    print(
        f"create->READY one addon at a time on the idle operator: {ready}/{asked} READY, p50 {s50:.2f} s, "
        f"p99 {s99:.2f} s, max {smax:.2f} s (goal < {GOAL_P99_S:.0f} s: {yes(ready == asked and s99 < GOAL_P99_S)})",
        flush=True,
    )


def print_summary(results: list[dict[str, Any]]) -> None:
    print("\n=== summary ===")
    print(
        f"{'N':>6} {'objects':>8} {'converged':>9} {'time s':>8} {'p50 s':>7} {'p99 s':>7} {'op req/s':>9} "
        f"{'req/obj/min':>11} {'fake req/s':>10} {'RSS MB':>7} {'CPU %':>6} {'1-by-1 p99 s':>12}"
    )
    for r in results:
        per_min = 60 * r["operator_rps"] / r["objects"]
        print(
            f"{r['n']:>6} {r['objects']:>8} {'yes' if r['converged'] else 'NO':>9} {r['converge_s']:>8.1f} "
            f"{r['lat_all'][0]:>7.2f} {r['lat_all'][1]:>7.2f} {r['operator_rps']:>9.1f} {per_min:>11.3f} "
            f"{r['fake_rps']:>10.1f} {r['rss_mb']:>7.0f} {r['cpu_pct']:>6.1f} {r['single'][3]:>12.2f}"
        )
    if len(results) >= 2:
        first, last = results[0], results[-1]
        a, b = first["operator_rps"] / first["objects"], last["operator_rps"] / last["objects"]
        # At a small N the idle window may hold no call of the operator at all: then there is no ratio.
        ratio = f"{b / a:.2f}x" if a > 0 else f"n/a (none at N={first['n']})"
        note = "" if first["converged"] and last["converged"] else " (a size did not converge: not comparable)"
        print(f"idle API calls per object, N={last['n']} vs N={first['n']}: {ratio} (goal: flat, ideally 0){note}")


async def main_async(args: argparse.Namespace) -> None:
    # SIGTERM stops everything as Ctrl-C does: the task is cancelled and the finally blocks stop every process.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="operator-scale-"))
    print(f"work dir: {workdir}{' (kept)' if args.keep else ''}", flush=True)
    results = []
    for n in args.sizes:
        results.append(await run_size(n, args, workdir))
    print_summary(results)
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="comma-separated N (Deployments), in order")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle window after convergence")
    parser.add_argument("--baseline", type=float, default=30.0, help="seconds of the baseline before any CR")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait before baseline and idle")
    parser.add_argument(
        "--quiet-max", type=float, default=300.0, help="seconds to wait at most for the API rate to settle"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for convergence per size")
    parser.add_argument(
        "--namespaces", type=int, default=1, help="spread the Deployments (with their addons) over this many namespaces"
    )
    parser.add_argument("--singles", type=int, default=20, help="addons created one at a time after the idle window")
    parser.add_argument("--concurrency", type=int, default=16, help="creates in flight at once")
    parser.add_argument("--top", type=int, default=8, help="verb/resource lines to print")
    parser.add_argument("--workdir", help="where the control planes and logs go (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    parser.add_argument("--serve-fake", type=int, metavar="STATS_PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake(args.serve_fake))
        return
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    enter_netns()
    try:
        asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
