"""The shipped product, driven as a user drives it: the chart installed with helm, manifests applied with
kubectl, completions asked with the official openai client through the router. The operator and router
authenticate as the chart's ServiceAccounts; model-server pods really run vLLM for CPU.

The tests run in order and build on each other (one cluster, one install): a multi-LoRA Deployment woken
from zero, two addons, an A/B split, a rollback flip, locked-down model servers, scaling 1→2→1 under load,
an RBAC rule taken away, a serverless addon, a live merge, the acting operator killed, scale to zero, the
dashboard's metrics, and finally deleting everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import yaml

from e2e.conftest import TIMINGS
from e2e.dashboard import dashboard_metric_names, exported_names
from e2e.harness import CHART, RELEASE, RUN_POOL_PLACEMENT, SYSTEM_NS, Product, operator_acting, run_helm, wait_for
from loraserve.addons import pool_name
from loraserve.api.naming import base_model_name
from loraserve.digest import directory_digest
from loraserve.tokens import ModelServerTokens
from loraserve.vllm.metrics import parse_metrics

API = "serving.loraserve.dev/v1alpha1"
PROMPT = "the river and the"
LOCAL = RUN_POOL_PLACEMENT
# What earlier steps learned and later steps check against.
seen: dict[str, Any] = {}


# -- how a user talks to the product -----------------------------------------------------------------------


def apply(product: Product, ns: str, *docs: dict[str, Any]) -> None:
    product.cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))


def get(product: Product, ns: str, *what: str) -> Any:
    result = product.cluster.kubectl("get", *what, "-n", ns, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def status(product: Product, ns: str, kind: str, name: str) -> dict[str, Any]:
    return (get(product, ns, kind, name) or {}).get("status") or {}


def spec_replicas(product: Product, ns: str, name: str) -> int:
    return int((get(product, ns, "lsd", name) or {}).get("spec", {}).get("replicas", -1))


def wait_state(product: Product, ns: str, kind: str, name: str, state: str, timeout: float = 300) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: status(product, ns, kind, name).get("state") == state and status(product, ns, kind, name),
        timeout=timeout,
        interval=0.5,
        message=f"{kind}/{name} {state} (now {status(product, ns, kind, name).get('state')})",
    )
    return result


def client(product: Product) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{product.router_url}/v1", api_key=product.api_key(), max_retries=0, timeout=600)


def complete(product: Product, model: str, user: str | None = None) -> tuple[str, str]:
    """(served model name, text) of a greedy completion through the router."""
    extra = {"user": user} if user else {}
    out = client(product).completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, **extra)
    return out.model, out.choices[0].text


def model_version(name: str, label: str, base: str, adapter: Path) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {
            "version": label,
            "baseModel": {"name": base, "revision": "local"},
            "adapter": {"uri": f"file://{adapter}", "digest": directory_digest(adapter), "rank": 8},
        },
    }


def addon(name: str, deployment: str | None, *targets: tuple[str, int]) -> dict[str, Any]:
    spec: dict[str, Any] = {"targets": [{"modelVersion": m, "weight": w} for m, w in targets]}
    if deployment:
        spec["deployment"] = deployment
    return {"apiVersion": API, "kind": "LoraAddon", "metadata": {"name": name}, "spec": spec}


def ready_pod_ips(product: Product, ns: str, deployment: str) -> list[str]:
    pods = get(product, ns, "pods", "-l", f"serving.loraserve.dev/deployment={deployment}")["items"]
    return [
        p["status"]["podIP"]
        for p in pods
        if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def acting_operators(product: Product) -> list[int]:
    """Indexes of live operator processes that are not paused in favour of a peer (Kopf peering)."""
    acting = []
    for i, op in enumerate(product.operators):
        if not op.running:
            continue
        if operator_acting(op.log_text()):
            acting.append(i)
    return acting


# -- the suite ---------------------------------------------------------------------------------------------


def test_chart_installs_and_exactly_one_operator_acts(product: Product) -> None:
    assert len(product.operators) == 2  # the chart's default: two replicas, peering keeps one acting
    assert all(op.running for op in product.operators)
    wait_for(lambda: len(acting_operators(product)) == 1, timeout=90, interval=1, message="one acting operator")

    def peers() -> int:
        peering = json.loads(product.cluster.kubectl("get", "clusterkopfpeering", "loraserve", "-o", "json").stdout)
        return len(peering.get("status") or {})

    # Both replicas announce themselves (the standby too, as soon as its keep-alive starts); the eldest acts.
    wait_for(lambda: peers() == 2, timeout=60, interval=1, message=lambda: f"both replicas as peers ({peers()})")


def test_multi_lora_deployment_wakes_from_zero_and_reaches_ready(
    product: Product, user_namespace: str, tiny_model: Path, adapters: dict[str, Path]
) -> None:
    ns, base = user_namespace, f"file://{tiny_model}"
    seen["base"] = base
    deployment = {
        "apiVersion": API,
        "kind": "Deployment",
        "metadata": {"name": "multi"},
        "spec": {
            "baseModel": base,
            "enableAddons": True,
            "maxLoraRank": 16,
            "minReplicas": 0,
            "maxReplicas": 2,
            "targetLoadPerReplica": 1,
            "scaleUpWindow": "5s",
            "scaleDownWindow": "2m",  # long enough for a second replica to start on a busy 2-core machine
            "scaleToZeroWindow": "5m",
            **LOCAL,
        },
    }
    apply(product, ns, deployment)
    # A new min-0 Deployment starts at zero: no GPU until someone asks.
    wait_state(product, ns, "lsd", "multi", "SCALED_TO_ZERO", timeout=60)

    # The first request wakes it; the router holds it until a replica is ready. Where does the time go?
    marks: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        # Each mark is the moment a poll saw it (polls take ~0.1-0.3 s each: that is the resolution).
        while not done.is_set():
            if "woken" not in marks and spec_replicas(product, ns, "multi") >= 1:
                marks["woken"] = time.monotonic()
            pods = (get(product, ns, "pods", "-l", "serving.loraserve.dev/deployment=multi") or {}).get("items", [])
            if pods and "pod" not in marks:
                marks["pod"] = time.monotonic()
            if "ready" not in marks and ready_pod_ips(product, ns, "multi"):
                marks["ready"] = time.monotonic()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    asked = time.monotonic()
    watcher.start()
    try:
        stream = client(product).completions.create(
            model=f"{base_model_name(base)}#multi", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
        )
        first_token = None
        text = ""
        for chunk in stream:
            if first_token is None:
                first_token = time.monotonic()
            text += chunk.choices[0].text if chunk.choices else ""
    finally:
        done.set()
        watcher.join()
    assert text
    assert first_token is not None
    assert {"woken", "pod", "ready"} <= set(marks), marks
    seen["base_text"] = text
    replica_start = marks["ready"] - marks["pod"]
    TIMINGS["wake from zero: request -> first token"] = first_token - asked
    TIMINGS["  router wake (request -> spec.replicas 1)"] = marks["woken"] - asked
    TIMINGS["  operator + controllers (replicas 1 -> pod exists)"] = marks["pod"] - marks["woken"]
    TIMINGS["  replica start (pod exists -> ready, vLLM CPU)"] = replica_start
    TIMINGS["  router after ready (ready -> first token)"] = first_token - marks["ready"]
    wait_state(product, ns, "lsd", "multi", "READY", timeout=120)


def test_two_addons_give_different_greedy_completions(
    product: Product, user_namespace: str, adapters: dict[str, Path]
) -> None:
    ns, base = user_namespace, seen["base"]
    apply(
        product,
        ns,
        model_version("poet-v1", "v1", base, adapters["alpha"]),
        model_version("poet-v2", "v2", base, adapters["beta"]),
        model_version("coder-v1", "v1", base, adapters["gamma"]),
    )
    applied = time.monotonic()
    apply(product, ns, addon("poet", "multi", ("poet-v1", 100)), addon("coder", "multi", ("coder-v1", 100)))
    for name in ("poet", "coder"):
        wait_state(product, ns, "addon", name, "READY", timeout=300)
    TIMINGS["adapter load: 2 LoraAddons applied -> both READY"] = time.monotonic() - applied
    poet, coder = complete(product, "poet#multi"), complete(product, "coder#multi")
    assert (poet[0], coder[0]) == ("poet-v1", "coder-v1")
    assert len({seen["base_text"], poet[1], coder[1]}) == 3  # three different models answered
    assert complete(product, "poet#multi") == poet  # greedy: stable
    seen["poet-v1"] = poet[1]


def test_ab_split_is_seen_in_routed_traffic(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    apply(product, ns, addon("poet", "multi", ("poet-v1", 50), ("poet-v2", 50)))
    wait_for(
        lambda: (
            status(product, ns, "addon", "poet").get("observedGeneration") == 2
            and status(product, ns, "addon", "poet").get("state") == "READY"
        ),
        timeout=300,
        message="poet 50/50 READY",
    )
    served: dict[str, str] = {}
    for i in range(40):
        model, text = complete(product, "poet#multi", user=f"user-{i}")
        served.setdefault(model, text)
    assert set(served) == {"poet-v1", "poet-v2"}  # both arms answered
    assert served["poet-v1"] == seen["poet-v1"]
    assert served["poet-v2"] != served["poet-v1"]
    seen["poet-v2"] = served["poet-v2"]


def test_rollback_is_a_pointer_flip_served_at_once(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    apply(product, ns, addon("poet", "multi", ("poet-v1", 100)))
    wait_for(lambda: "poet-v2" in (status(product, ns, "addon", "poet").get("retired") or {}), message="v2 kept warm")
    assert all(complete(product, "poet#multi", user=f"u{i}")[0] == "poet-v1" for i in range(5))
    # Flip back: v2 never left the replicas, so the very first requests after the flip are v2's.
    flipped = time.monotonic()
    apply(product, ns, addon("poet", "multi", ("poet-v2", 100)))
    _, text = wait_for(
        lambda: (answer := complete(product, "poet#multi"))[0] == "poet-v2" and answer,
        timeout=30,
        interval=0.1,
        message="poet-v2 served after the flip",
    )
    TIMINGS["rollback flip: spec applied -> first answer from the new version"] = time.monotonic() - flipped
    assert text == seen["poet-v2"]


def test_a_failing_version_is_rolled_back_automatically(product: Product, user_namespace: str) -> None:
    """poet v3's adapter cannot be fetched, so each request routed to it ends in the router's 503 (held for
    an adapter no replica has): the autoRollback rule moves its traffic to control through status alone."""
    ns = user_namespace
    broken = {
        "apiVersion": API,
        "kind": "ModelVersion",
        "metadata": {"name": "poet-v3"},
        "spec": {
            "version": "v3",
            "baseModel": {"name": seen["base"], "revision": "local"},
            "adapter": {"uri": "file:///gone"},
        },
    }
    timeout = "serving.loraserve.dev/scale-from-zero-timeout"
    product.cluster.kubectl("annotate", "lsd", "multi", "-n", ns, f"{timeout}=3s", "--overwrite")
    poet = addon("poet", "multi", ("poet-v2", 50), ("poet-v3", 50))
    poet["spec"]["autoRollback"] = {"control": "poet-v2", "maxErrorRate": 0.2, "minRequests": 4, "window": "2m"}
    apply(product, ns, broken, poet)
    applied = get(product, ns, "addon", "poet")

    def answer(user: str) -> str:
        try:
            return complete(product, "poet#multi", user=user)[0]
        except openai.APIStatusError as exc:
            return str(exc.status_code)

    users = [f"roll-{i}" for i in range(12)]
    first = wait_for(
        lambda: (got := [answer(u) for u in users]) and "503" in got and got,
        timeout=120,
        message="poet-v3 failing under traffic",
    )
    assert set(first) == {"poet-v2", "503"}
    st = wait_for(
        lambda: (
            status(product, ns, "addon", "poet").get("autoRollback", {}).get("rolledBack")
            and status(product, ns, "addon", "poet")
        ),
        timeout=120,
        message="rolled back",
    )
    assert (st["autoRollback"]["modelVersion"], st["autoRollback"]["metric"]) == ("poet-v3", "errorRate")
    rolled = next(c for c in st["conditions"] if c["type"] == "RolledBack")
    assert (rolled["status"], rolled["reason"]) == ("True", "ErrorRateExceeded")
    events = get(product, ns, "events", "--field-selector", "involvedObject.name=poet,reason=RolledBack")["items"]
    assert events
    now = get(product, ns, "addon", "poet")
    assert (now["spec"], now["metadata"]["generation"]) == (applied["spec"], applied["metadata"]["generation"])
    wait_for(lambda: all(answer(u) == "poet-v2" for u in users), timeout=60, message="all traffic on control")
    # Re-armed by the user's next spec (v3 out), and the short hold bound taken away again.
    apply(product, ns, addon("poet", "multi", ("poet-v2", 100)))
    product.cluster.kubectl("annotate", "lsd", "multi", "-n", ns, f"{timeout}-")
    wait_for(lambda: status(product, ns, "addon", "poet").get("state") == "READY", timeout=120, message="poet READY")


def test_model_servers_refuse_callers_without_the_token(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    (ip, *_) = ready_pod_ips(product, ns, "multi")

    def call(url: str, method: str = "GET", token: str | None = None, body: bytes | None = None) -> int:
        request = urllib.request.Request(url, data=body, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    fetch = json.dumps({"name": "evil", "uri": "file:///etc"}).encode()
    assert call(f"http://{ip}:8000/v1/models") == 401  # vLLM --api-key
    assert call(f"http://{ip}:8000/v1/unload_lora_adapter", "POST", body=b'{"lora_name":"poet-v1"}') == 401
    assert call(f"http://{ip}:8001/fetch", "POST", body=fetch) == 401  # the fetcher sidecar
    assert call(f"http://{ip}:8001/adapters/poet-v1", "DELETE") == 401
    assert call(f"http://{ip}:8001/fetch", "POST", token="wrong", body=fetch) == 401
    # The token the operator keeps in the Deployment's Secret opens it (the router and the operator hold it).
    token = ModelServerTokens(product.model_server_key()).token(ns, "multi")
    assert call(f"http://{ip}:8000/v1/models", token=token) == 200
    # The Service publishes vLLM's port only; the token is nowhere in the CR.
    service = get(product, ns, "service", "multi")
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    assert token is not None
    assert token not in json.dumps(get(product, ns, "lsd", "multi"))
    assert all(token not in op.log_text() for op in product.operators)
    # ... and the router path still works, with the API key the chart generated (auth is on by default).
    assert complete(product, "coder#multi")[0] == "coder-v1"
    ask = json.dumps({"model": "coder#multi", "prompt": "x", "max_tokens": 1}).encode()
    assert call(f"{product.router_url}/v1/completions", "POST", body=ask) == 401
    assert call(f"{product.router_url}/v1/completions", "POST", token="lsk-guessed", body=ask) == 401
    assert call(f"{product.router_url}/v1/models") == 401


def loraserve(product: Product, *args: str) -> subprocess.CompletedProcess[str]:
    """The `loraserve` CLI as a user runs it, against the user's kubeconfig."""
    env = {**product.cluster.env(), "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "loraserve.cli.main", *args], env=env, capture_output=True, text=True, timeout=900
    )


def test_cli_loads_a_local_adapter_that_then_answers(
    product: Product, user_namespace: str, adapters: dict[str, Path]
) -> None:
    ns = user_namespace
    adapter, base = str(adapters["alpha"]), seen["base"]
    made = loraserve(product, "create", "model-version", "cli-v1", "--base", base, "--adapter", adapter, "-n", ns)
    assert made.returncode == 0, made.stdout + made.stderr
    digest = get(product, ns, "mv", "cli-v1")["spec"]["adapter"]["digest"]
    assert digest == directory_digest(adapters["alpha"])  # computed from the local directory
    loaded = loraserve(product, "load-lora", "cli-v1", "--deployment", "multi", "--wait", "-n", ns)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "READY" in loaded.stdout + loaded.stderr  # the live progress ended on the addon's state
    # The same adapter as poet v1, loaded by the CLI under its own name: the same greedy answer.
    assert complete(product, "cli#multi") == ("cli-v1", seen["poet-v1"])
    refused = loraserve(product, "update", "deployment", "multi", "--region", "elsewhere", "-n", ns)
    assert refused.returncode == 3  # admission refused it, and the CLI says only which field and why
    assert "spec.region" in refused.stdout + refused.stderr
    unloaded = loraserve(product, "unload-lora", "cli", "-n", ns)
    assert unloaded.returncode == 0, unloaded.stdout + unloaded.stderr
    wait_for(lambda: get(product, ns, "addon", "cli") is None, timeout=120, interval=1, message="cli addon gone")


def test_operator_killed_midway_converges(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    (acting,) = acting_operators(product)
    product.operators[acting].kill()
    # A change made while the acting operator is gone: the standby takes over and converges it.
    apply(product, ns, addon("coder", "multi", ("coder-v1", 50), ("poet-v2", 50)))
    wait_for(
        lambda: (
            status(product, ns, "addon", "coder").get("observedGeneration") == 2
            and status(product, ns, "addon", "coder").get("state") == "READY"
        ),
        timeout=240,
        interval=1,
        message=lambda: f"the standby operator converged coder; status {status(product, ns, 'addon', 'coder')}",
    )
    product.operators[acting].start()
    wait_for(lambda: len(acting_operators(product)) == 1, timeout=120, interval=1, message="one acting again")
    # Versions are served as <addon>-<version label>: poet-v2's adapter is coder-v2 here.
    assert {complete(product, "coder#multi", user=f"u{i}")[0] for i in range(30)} == {"coder-v1", "coder-v2"}


def test_scales_up_to_two_under_load_and_back_to_one(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    model = f"{base_model_name(seen['base'])}#multi"
    stop = threading.Event()
    errors: list[Exception] = []

    def client_loop() -> None:
        while not stop.is_set():
            try:
                client(product).completions.create(
                    model=model, prompt=PROMPT, max_tokens=200, temperature=0, extra_body={"ignore_eos": True}
                )
            except Exception as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: spec_replicas(product, ns, "multi") == 2 or errors, timeout=120, interval=0.5, message="scale to 2"
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[:3]
    assert "ScaleUp" in status(product, ns, "lsd", "multi")["scaleReason"]
    # Within the down-window the second replica starts, and gets the addons before it counts as loaded.
    wait_for(
        lambda: status(product, ns, "addon", "coder").get("loadedReplicas") == 2,
        timeout=400,
        interval=0.5,
        message="coder loaded on 2 replicas",
    )
    assert len(ready_pod_ips(product, ns, "multi")) == 2
    streams_survive_their_replica_being_deleted(product, ns, model)
    wait_for(lambda: spec_replicas(product, ns, "multi") == 1, timeout=300, interval=0.5, message="scale down to 1")
    assert "ScaleDown" in status(product, ns, "lsd", "multi")["scaleReason"]
    seen["last_request"] = status(product, ns, "lsd", "multi")["lastRequestTime"]


def streams_survive_their_replica_being_deleted(product: Product, ns: str, model: str) -> None:
    """A replica deleted (a node drain, an eviction, a scale-down) while it streams: its preStop hook drains
    it, so the streams it started finish whole, and the router sends nothing new to it meanwhile.

    A 200-token stream of the tiny model lasts about 2 s on CPU, and vLLM's /metrics may take more than 1 s to
    answer while it generates. So a look can miss the streams; then they are checked whole and started again."""
    tokens = 200
    tries = 5
    for _ in range(tries):
        pods = get(product, ns, "pods", "-l", "serving.loraserve.dev/deployment=multi")["items"]
        ips = {p["metadata"]["name"]: p["status"].get("podIP") for p in pods}
        streams = Streams(product, model, tokens, count=2)
        wait_for(streams.flowing, timeout=120, interval=0.05, message="both streams flowing")
        assert not streams.errors, streams.errors
        busy = replica_while_streaming(ips, streams)
        if busy is None:  # they ended before a look saw them: whole all the same, and no replica deleted
            streams.join()
            assert not streams.errors, streams.errors
            assert streams.generated == [tokens, tokens]
            continue
        product.cluster.kubectl("delete", "pod", busy, "-n", ns, "--wait=false")
        during = complete(product, model)  # a new request meanwhile goes to the replica that stays
        streams.join()
        assert not streams.errors, streams.errors
        assert streams.generated == [tokens, tokens]  # whole: the deleted replica finished what it had started
        assert during[1]
        return
    raise AssertionError(f"in {tries} tries the streams always ended before a replica's metrics showed them")


class Streams:
    """`count` greedy streams of `tokens` tokens each through the router, each on a thread of its own."""

    def __init__(self, product: Product, model: str, tokens: int, count: int) -> None:
        self.chunks = [0] * count
        self.generated = [0] * count  # completion tokens in each stream's final usage chunk: only a whole one has it
        self.errors: list[Exception] = []
        self._product, self._model, self._tokens = product, model, tokens
        self._threads = [threading.Thread(target=self._stream, args=(i,)) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _stream(self, i: int) -> None:
        try:
            for chunk in client(self._product).completions.create(
                model=self._model,
                prompt=PROMPT,
                max_tokens=self._tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            ):
                self.chunks[i] += 1
                if chunk.usage is not None:
                    self.generated[i] = chunk.usage.completion_tokens
        except Exception as exc:
            self.errors.append(exc)

    def flowing(self) -> bool:
        """Every stream has had a chunk, or one failed."""
        return min(self.chunks) >= 1 or bool(self.errors)

    @property
    def in_flight(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(300)


def replica_while_streaming(ips: dict[str, str | None], streams: Streams) -> str | None:
    """The name of a pod (of `ips`, name -> pod IP) whose vLLM shows requests in flight, seen while `streams`
    are still streaming; None once they have ended. vLLM's gauges may trail the first token by a moment."""
    with ThreadPoolExecutor(max(len(ips), 1)) as looks:  # all at once: one slow answer must not hide another
        while streams.in_flight:
            loads = dict(zip(ips, looks.map(vllm_load, ips.values()), strict=True))
            busy = next((name for name, load in loads.items() if load > 0), None)
            if busy is not None and streams.in_flight:
                return busy
    return None


def vllm_load(ip: str | None) -> int:
    if not ip:
        return 0
    try:
        with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=5) as resp:
            return parse_metrics(resp.read().decode()).load
    except (OSError, ValueError):
        return 0


def test_a_missing_rbac_rule_fails_the_matching_path_with_403(
    product: Product, user_namespace: str, adapters: dict[str, Path]
) -> None:
    """The chart rendered without the operator's `create` on our Deployments: the serverless pool cannot be
    made, and the operator says 403. With the chart's rule back, the same addon gets its pool."""
    ns = user_namespace
    role_name = f"{RELEASE}-operator"
    role = next(d for d in product.manifests if d["kind"] == "ClusterRole" and d["metadata"]["name"] == role_name)
    crippled = json.loads(json.dumps(role))
    for rule in crippled["rules"]:
        if "serving.loraserve.dev" in rule["apiGroups"] and rule["resources"] == ["deployments"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    assert crippled != role, "the chart no longer has the rule this test takes away"
    product.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(crippled))
    other_base = "hf://example/other-base"
    pool = pool_name(other_base)

    def refused() -> bool:
        return any(
            "403" in (log := op.log_text()) and "cannot create resource" in log and "serving.loraserve.dev" in log
            for op in product.operators
        )

    try:
        assert not refused()
        apply(
            product,
            ns,
            model_version("solo-v1", "v1", other_base, adapters["gamma"]),
            addon("solo", None, ("solo-v1", 100)),
        )
        wait_for(refused, timeout=60, interval=1, message="the operator's 403")
        assert get(product, ns, "lsd", pool) is None
    finally:
        product.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(role))
    wait_for(lambda: get(product, ns, "lsd", pool) is not None, timeout=120, interval=1, message="pool created")
    product.cluster.kubectl("delete", "addon", "solo", "-n", ns)
    product.cluster.kubectl("delete", "lsd", pool, "-n", ns, "--wait=false")


def test_serverless_addon_answers(product: Product, user_namespace: str) -> None:
    ns, base = user_namespace, seen["base"]
    apply(product, ns, addon("haiku", None, ("poet-v1", 100)))
    pool = pool_name(base)
    wait_for(lambda: status(product, ns, "addon", "haiku").get("deployment") == pool, timeout=60, message="seated")
    # The pool starts at zero; the first request wakes it and is held until the adapter is loaded.
    model, text = complete(product, f"haiku#{pool}")
    assert model == "haiku-v1"
    assert text == seen["poet-v1"]  # the same adapter as poet v1, served by the shared pool
    # A serverless addon is callable by its own name alone, as a user of a serverless API writes it.
    assert complete(product, "haiku") == (model, text)
    assert complete(product, f"accounts/{ns}/models/haiku") == (model, text)


def test_live_merge_serves_base_plus_adapter(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    merged = {
        "apiVersion": API,
        "kind": "Deployment",
        "metadata": {"name": "merged"},
        "spec": {"modelVersion": "poet-v1", "minReplicas": 1, **LOCAL},
    }
    applied = time.monotonic()
    apply(product, ns, merged)
    wait_state(product, ns, "lsd", "merged", "READY", timeout=400)
    TIMINGS["apply -> READY (live merge, minReplicas 1)"] = time.monotonic() - applied
    _, text = complete(product, "merged#merged")
    assert text == seen["poet-v1"]  # merged weights answer exactly as base + adapter


def test_scales_to_zero_after_the_window(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    wait_for(lambda: spec_replicas(product, ns, "multi") == 0, timeout=420, interval=2, message="multi at zero")
    wait_state(product, ns, "lsd", "multi", "SCALED_TO_ZERO", timeout=120)
    wait_for(lambda: not ready_pod_ips(product, ns, "multi"), timeout=120, message="no multi pod")


def test_dashboard_queries_only_metrics_the_live_product_exports(product: Product) -> None:
    """Scrape the live router and operators; a dashboard query naming a metric neither exports fails here."""
    texts = [scrape(product.router_url + "/metrics")]
    texts += [scrape(product.operator_metrics_url(i)) for i, op in enumerate(product.operators) if op.running]
    exported: set[str] = set()
    for text in texts:
        exported |= exported_names(text) | declared_names(text)
    wanted = dashboard_metric_names(CHART / "dashboards" / "loraserve.json")
    assert "loraserve_router_requests_total" in wanted  # the reading found the dashboard's queries
    assert wanted <= exported, sorted(wanted - exported)


def pod_processes(pods_dir: Path) -> list[str]:
    """Processes the local runtime started for pods (each runs in its pod's directory): vLLM, the fetcher."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cwd").readlink().is_relative_to(pods_dir):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120])
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def declared_names(text: str) -> set[str]:
    """Series names a family declares (`# TYPE`) even before its first sample (a counter nobody hit yet)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names |= {base + s for s in suffixes.get(kind, ("",))}
    return names


def test_deleting_everything_leaves_nothing_behind(product: Product, user_namespace: str) -> None:
    ns = user_namespace
    for kind in ("addon", "lsd", "mv"):
        product.cluster.kubectl("delete", kind, "--all", "-n", ns, "--timeout=180s")
    for kind in ("pods", "deployments.apps", "services", "networkpolicies", "secrets", "lsd", "addon", "mv"):
        wait_for(
            lambda kind=kind: not get(product, ns, kind)["items"], timeout=180, interval=1, message=f"no {kind} left"
        )
    wait_for(
        lambda: not pod_processes(product.workdir / "pods"),
        timeout=120,
        message=lambda: f"no model-server process left; still running: {pod_processes(product.workdir / 'pods')}",
    )
    # No network namespace holds an address of this suite's pod network any more.
    for netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
        if netns.strip():
            addrs = subprocess.run(["ip", "-n", netns.split()[0], "-o", "addr"], capture_output=True, text=True)
            assert " 10.244.150." not in addrs.stdout, f"network namespace {netns} left behind"
    run_helm(product.cluster, "uninstall", RELEASE, "-n", SYSTEM_NS, "--wait")
    left = product.cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout
    assert f"{RELEASE}-operator" not in left
    assert f"{RELEASE}-router" not in left
    secrets = product.cluster.kubectl("get", "secrets", "-n", SYSTEM_NS, "-o", "name").stdout
    assert f"{RELEASE}-model-server-key" not in secrets
