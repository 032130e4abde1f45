"""Release safety on real vLLM pods, the real operator and the real router watching the cluster:

- a treatment version that fails under traffic (its adapter cannot be fetched, so each of its requests ends
  in the router's 503) is rolled back by the autoRollback rule: traffic moves to control through status only
  (the user's spec and generation untouched), with a RolledBack condition and Event; the annotation re-arms it;
- rollback by hand is a pointer flip: a version leaving the targets stays loaded (warm), so flipping back and
  forth under steady traffic serves at once with zero errors;
- a serverless addon answers by its own name; deleting it unloads it from the pool's replica; the pool is
  garbage-collected once it has no addon and no traffic."""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from e2e.harness import RUN_POOL_PLACEMENT

from loraserve.addons import pool_name
from loraserve.api.addon import REARM_ANNOTATION
from loraserve.digest import directory_digest
from loraserve.local.cluster import LocalCluster
from loraserve.router.topology import SCALE_FROM_ZERO_TIMEOUT_ANNOTATION
from tests.integration.conftest import Operator, apply, get, status, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.slow]
API = "serving.loraserve.dev/v1alpha1"


def version(name: str, label: str, base: str, adapter: Path | None) -> dict[str, Any]:
    source = {"uri": f"file://{adapter}", "digest": directory_digest(adapter)} if adapter else {"uri": "file:///gone"}
    return {
        "apiVersion": API,
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {"version": label, "baseModel": {"name": base, "revision": "local"}, "adapter": source},
    }


def bot(*targets: tuple[str, int], rule: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"deployment": "tiny", "targets": [{"modelVersion": m, "weight": w} for m, w in targets]}
    if rule:
        spec["autoRollback"] = {"maxErrorRate": 0.2, "minRequests": 4, "window": "2m", "control": "bot-v1"}
    return {"apiVersion": API, "kind": "LoraAddon", "metadata": {"name": "bot"}, "spec": spec}


def client(router: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=timeout)


def ask(router: str, model: str, user: str) -> str:
    """The served version's name that answered, or the HTTP status of an error as text."""
    try:
        out = client(router).completions.create(model=model, prompt="the river", max_tokens=2, user=user)
        return out.model
    except openai.APIStatusError as exc:
        return str(exc.status_code)


def replica_models(cluster: LocalCluster, ns: str, deployment: str) -> set[str]:
    pods = get(cluster, ns, "pods", "-l", f"serving.loraserve.dev/deployment={deployment}")["items"]
    ips = [p["status"]["podIP"] for p in pods if p.get("status", {}).get("podIP")]
    names: set[str] = set()
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:8000/v1/models", timeout=10) as resp:
            names |= {m["id"] for m in json.load(resp)["data"]}
    return names


def rollback_condition(st: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in st.get("conditions", []) if c["type"] == "RolledBack")


def test_auto_rollback_then_flips_by_hand_under_traffic(
    cluster: LocalCluster,
    operator: Operator,
    router: str,
    run_pool: str,
    namespace: str,
    tiny_model: Path,
    adapters: dict[str, Path],
) -> None:
    ns = namespace
    base = f"file://{tiny_model}"
    deployment = {
        "apiVersion": API,
        "kind": "Deployment",
        # a request for an adapter no replica has is held this long, then answered 503
        "metadata": {"name": "tiny", "annotations": {SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "3s"}},
        "spec": {
            "baseModel": base,
            "enableAddons": True,
            "maxLoras": 4,
            "maxLoraRank": 16,
            "minReplicas": 1,
            **RUN_POOL_PLACEMENT,
        },
    }
    apply(cluster, ns, deployment)
    wait_for(lambda: status(cluster, ns, "lsd", "tiny").get("state") == "READY", timeout=400, message="tiny READY")
    apply(
        cluster,
        ns,
        version("bot-v1", "v1", base, adapters["alpha"]),
        version("bot-v2", "v2", base, None),  # its adapter cannot be fetched: every v2 request fails
        version("bot-v3", "v3", base, adapters["beta"]),
        bot(("bot-v1", 50), ("bot-v2", 50)),
    )
    wait_for(lambda: ask(router, "bot-v1#tiny", "probe") == "bot-v1", timeout=120, message="bot-v1 served")
    before = get(cluster, ns, "addon", "bot")

    # Traffic: half of it goes to the failing v2 (sticky per user).
    users = [f"user-{i}" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda u: ask(router, "bot#tiny", u), users))
    assert set(answers) == {"bot-v1", "503"}

    st = wait_for(
        lambda: (
            status(cluster, ns, "addon", "bot").get("autoRollback", {}).get("rolledBack")
            and status(cluster, ns, "addon", "bot")
        ),
        timeout=60,
        message=lambda: f"rolled back ({status(cluster, ns, 'addon', 'bot').get('autoRollback')})",
    )
    record = st["autoRollback"]
    assert (record["modelVersion"], record["metric"], record["control"]) == ("bot-v2", "errorRate", "bot-v1")
    assert record["value"] == 1.0
    assert record["controlValue"] == 0.0
    assert record["requests"] >= 4
    assert st["effectiveTargets"] == [
        {"modelVersion": "bot-v1", "weight": 100},
        {"modelVersion": "bot-v2", "weight": 0},
    ]
    assert st["versions"] == "v1:100,v2:0"  # what `kubectl get lora` shows: the weights traffic follows
    condition = rollback_condition(st)
    assert (condition["status"], condition["reason"]) == ("True", "ErrorRateExceeded")
    assert "bot-v2" in condition["message"]
    events = get(cluster, ns, "events", "--field-selector", "involvedObject.name=bot,reason=RolledBack")["items"]
    assert events
    assert "bot-v2" in events[0]["message"]
    after = get(cluster, ns, "addon", "bot")
    assert after["spec"] == before["spec"]  # the user's spec is never written
    assert after["metadata"]["generation"] == before["metadata"]["generation"]

    # The router routes by status: the users that got v2 now get control.
    wait_for(lambda: all(ask(router, "bot#tiny", u) == "bot-v1" for u in users[:4]), timeout=30, message="moved")
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(lambda u: ask(router, "bot#tiny", u), users)) == {"bot-v1"}

    # Re-armed by the annotation: the spec's 50/50 again, a fresh window; v2 still fails, so it fires again.
    cluster.kubectl("annotate", "addon", "bot", "-n", ns, f"{REARM_ANNOTATION}=1")
    wait_for(
        lambda: rollback_condition(status(cluster, ns, "addon", "bot"))["reason"] == "Rearmed",
        timeout=30,
        message="re-armed",
    )
    assert status(cluster, ns, "addon", "bot")["effectiveTargets"][1] == {"modelVersion": "bot-v2", "weight": 50}
    v2_user = next(u for u, a in zip(users, answers, strict=True) if a == "503")
    wait_for(lambda: ask(router, "bot#tiny", v2_user) == "503", timeout=30, message="v2 routed again")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda u: ask(router, "bot#tiny", u), users))
    wait_for(
        lambda: status(cluster, ns, "addon", "bot").get("autoRollback", {}).get("rolledBack"),
        timeout=60,
        message="fired again after the re-arm",
    )

    # A new generation re-arms it too: v3 (good) replaces v2; both versions loaded.
    apply(cluster, ns, bot(("bot-v1", 50), ("bot-v3", 50)))
    wait_for(lambda: {"bot-v1", "bot-v3"} <= replica_models(cluster, ns, "tiny"), timeout=120, message="v3 loaded")
    st = wait_for(
        lambda: status(cluster, ns, "addon", "bot").get("state") == "READY" and status(cluster, ns, "addon", "bot"),
        timeout=60,
    )
    assert st["autoRollback"]["rolledBack"] is False

    # Rollback by hand, back and forth, under steady traffic: zero errors, no load step in between.
    seen: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            seen.append(ask(router, "bot#tiny", f"steady-{i}"))
            i += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        for to in ("bot-v1", "bot-v3", "bot-v1"):
            apply(cluster, ns, bot((to, 100), rule=False))
            wait_for(lambda to=to: seen[-3:] == [to] * 3, timeout=60, message=f"flip to {to}")  # type: ignore[misc]
            # the version that left is still loaded (warm): the next flip needs no load
            assert {"bot-v1", "bot-v3"} <= replica_models(cluster, ns, "tiny")
        retired = status(cluster, ns, "addon", "bot").get("retired") or {}
        assert "bot-v3" in retired
    finally:
        stop.set()
        worker.join(120)
    assert seen
    assert set(seen) <= {"bot-v1", "bot-v3"}, f"errors under traffic: {[s for s in seen if s.isdigit()]}"


def test_serverless_addon_by_name_unloaded_on_delete_and_pool_collected(
    cluster: LocalCluster,
    operator: Operator,
    router: str,
    run_pool: str,
    namespace: str,
    tiny_model: Path,
    adapters: dict[str, Path],
) -> None:
    ns = namespace
    base = f"file://{tiny_model}"
    pool = pool_name(base)
    haiku = {"apiVersion": API, "kind": "LoraAddon", "metadata": {"name": "haiku"}}
    haiku["spec"] = {"targets": [{"modelVersion": "haiku-v1", "weight": 100}]}
    apply(cluster, ns, version("haiku-v1", "v1", base, adapters["alpha"]), haiku)
    wait_for(lambda: status(cluster, ns, "addon", "haiku").get("deployment") == pool, timeout=60, message="seated")

    # By its own name: the router wakes the pool from zero and holds the request until the adapter is loaded.
    out = client(router, 500).completions.create(model="haiku", prompt="the river", max_tokens=4, temperature=0)
    assert out.model == "haiku-v1"
    qualified = client(router).completions.create(
        model=f"accounts/{ns}/models/haiku", prompt="the river", max_tokens=4, temperature=0
    )
    assert qualified.choices[0].text == out.choices[0].text
    assert "haiku-v1" in replica_models(cluster, ns, pool)
    assert get(cluster, ns, "lsd", pool) is not None

    cluster.kubectl("delete", "addon", "haiku", "-n", ns, "--wait=true", "--timeout=60s")
    assert "haiku-v1" not in replica_models(cluster, ns, pool)  # unloaded before the object went
    with pytest.raises(openai.NotFoundError):
        client(router).completions.create(model="haiku", prompt="x", max_tokens=1)

    # No addon and no traffic: the pool goes after its grace (20 s in these tests), with an Event.
    wait_for(lambda: get(cluster, ns, "lsd", pool) is None, timeout=120, message="pool collected")
