"""LoraAddons on real vLLM replicas: the operator fetches each adapter beside vLLM, checks its digest,
loads it on every ready replica, reloads after a restart, follows scale-out, refuses what cannot work
with a clear reason, and unloads on removal. The pods really run (vLLM CPU in a network namespace)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from loraserve.api.naming import base_model_name
from loraserve.digest import directory_digest
from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import RUN_TOLERATION, Operator, apply, get, status, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.slow]
API = "serving.loraserve.dev/v1alpha1"


def version(name: str, label: str, base: str, adapter: Path, **adapter_extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {
            "version": label,
            "baseModel": {"name": base, "revision": "local"},
            "adapter": {"uri": f"file://{adapter}", "digest": directory_digest(adapter), **adapter_extra},
        },
    }


def addon(name: str, *targets: tuple[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "LoraAddon",
        "metadata": {"name": name},
        "spec": {"deployment": "tiny", "targets": [{"modelVersion": m, "weight": w} for m, w in targets]},
    }


def replica_ips(cluster: LocalCluster, ns: str) -> list[str]:
    pods = get(cluster, ns, "pods", "-l", "serving.loraserve.dev/deployment=tiny")["items"]
    return [
        p["status"]["podIP"]
        for p in pods
        if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def complete(ip: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"http://{ip}:8000/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(model=model, prompt="the river and the", max_tokens=8, temperature=0)
    return out.choices[0].text


def wait_state(
    cluster: LocalCluster, ns: str, kind: str, name: str, state: str, timeout: float = 120
) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: status(cluster, ns, kind, name).get("state") == state and status(cluster, ns, kind, name),
        timeout=timeout,
        message=f"{kind}/{name} {state} (now {status(cluster, ns, kind, name).get('state')})",
    )
    return result


def test_addons_on_real_replicas(
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
    apply(
        cluster,
        ns,
        {
            "apiVersion": API,
            "kind": "Deployment",
            "metadata": {"name": "tiny"},
            "spec": {
                "baseModel": base,
                "enableAddons": True,
                "maxLoras": 4,
                "maxLoraRank": 16,
                "minReplicas": 1,
                "maxReplicas": 2,
                "region": run_pool,
                "tolerations": [RUN_TOLERATION],
                "extraArgs": ["--max-model-len=256", "--dtype=float32"],
            },
        },
    )
    wait_state(cluster, ns, "lsd", "tiny", "READY", timeout=400)
    (ip,) = replica_ips(cluster, ns)
    served = base_model_name(base)
    base_text = complete(ip, served)

    # Two addons: each is fetched beside vLLM, digest-checked and loaded under <addon>-<version>.
    apply(
        cluster,
        ns,
        version("chat-v1", "v1", base, adapters["alpha"], rank=8),
        version("sql-v1", "v1", base, adapters["beta"], rank=8),
        addon("chat", ("chat-v1", 100)),
        addon("sql", ("sql-v1", 100)),
    )
    for name in ("chat", "sql"):
        st = wait_state(cluster, ns, "addon", name, "READY")
        assert (st["loadedReplicas"], st["totalReplicas"]) == (1, 1)
    chat, sql = complete(ip, "chat-v1"), complete(ip, "sql-v1")
    assert len({base_text, chat, sql}) == 3
    assert complete(ip, "chat-v1") == chat  # greedy: stable

    # Refusals, each with its reason; nothing else is harmed.
    apply(
        cluster,
        ns,
        version("broken-v1", "v1", base, adapters["corrupt"]),
        addon("broken", ("broken-v1", 100)),
        version("other-v1", "v1", "hf://someone/another-base", adapters["gamma"]),
        addon("other", ("other-v1", 100)),
        version("wide-v1", "v1", base, adapters["wide"], rank=32),
        addon("wide", ("wide-v1", 100)),
    )
    broken = wait_state(cluster, ns, "addon", "broken", "FAILED")
    stalled = next(c for c in broken["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "AdapterLoadFailed"
    assert "broken-v1" in stalled["message"]
    other = wait_state(cluster, ns, "addon", "other", "FAILED")
    assert next(c for c in other["conditions"] if c["type"] == "Stalled")["reason"] == "BaseModelMismatch"
    assert "hf://someone/another-base" in other["message"]
    wide = wait_state(cluster, ns, "addon", "wide", "FAILED")
    assert next(c for c in wide["conditions"] if c["type"] == "Stalled")["reason"] == "AdapterRankTooHigh"
    assert complete(ip, "chat-v1") == chat
    assert complete(ip, served) == base_text

    # A digest that does not match the files: refused before vLLM ever reads them.
    tampered = version("tampered-v1", "v1", base, adapters["gamma"], rank=8)
    tampered["spec"]["adapter"]["digest"] = "sha256:" + "0" * 64
    apply(cluster, ns, tampered, addon("tampered", ("tampered-v1", 100)))
    st = wait_state(cluster, ns, "addon", "tampered", "FAILED")
    assert next(c for c in st["conditions"] if c["type"] == "Stalled")["reason"] == "AdapterDigestMismatch"
    cluster.kubectl("delete", "addon", "broken", "tampered", "other", "wide", "-n", ns)

    # vLLM restarts (and forgets its adapters): the operator notices and loads them again.
    assert kill_model_server(ip), "no vLLM process found in the pod's network namespace"
    wait_for(
        lambda: status(cluster, ns, "addon", "chat").get("loadedReplicas") == 0, timeout=60, message="restart seen"
    )
    wait_state(cluster, ns, "addon", "chat", "READY", timeout=400)
    assert complete(ip, "chat-v1") == chat

    # Scale-out: the new replica gets every addon before it counts as loaded.
    cluster.kubectl("scale", "lsd", "tiny", "-n", ns, "--replicas=2")
    wait_for(lambda: status(cluster, ns, "addon", "sql").get("loadedReplicas") == 2, timeout=400, message="2/2 loaded")
    for replica in replica_ips(cluster, ns):
        assert complete(replica, "sql-v1") == sql

    # Removal unloads from every replica.
    cluster.kubectl("delete", "addon", "sql", "-n", ns)
    for replica in replica_ips(cluster, ns):
        with pytest.raises(openai.NotFoundError):
            complete(replica, "sql-v1")
        assert complete(replica, "chat-v1") == chat

    # An idle addon is unloaded (its GPU slot freed) and loads again on its next request: the router holds
    # the request until a replica reports the adapter.
    cluster.kubectl("annotate", "addon", "chat", "-n", ns, "serving.loraserve.dev/idle-unload-after=20s")
    wait_state(cluster, ns, "addon", "chat", "UNLOADED", timeout=120)
    for replica in replica_ips(cluster, ns):
        with pytest.raises(openai.NotFoundError):
            complete(replica, "chat-v1")
    # The router learns of the unload from its /v1/models poll (every 1 s here); a request in that gap would
    # reach a replica that just unloaded the adapter (a known race: the router does not yet re-hold on a 404).
    time.sleep(3)
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=300)
    out = client.completions.create(model="chat#tiny", prompt="the river and the", max_tokens=8, temperature=0)
    assert out.choices[0].text == chat
    # The router sees the adapter in /v1/models as soon as vLLM has it; the operator writes READY after the load
    # returns, so status may trail the answer by one reconcile.
    wait_state(cluster, ns, "addon", "chat", "READY", timeout=60)


def kill_model_server(ip: str) -> list[int]:
    """SIGKILL the vLLM processes of the pod with this IP (everything in its network namespace but the
    fetcher), as a crash would. vLLM renames its processes, so they are found by namespace, not by name."""
    for netns in os.listdir("/run/netns"):
        addrs = subprocess.run(["ip", "-n", netns, "-o", "addr"], capture_output=True, text=True).stdout
        if f" {ip}/" not in addrs:
            continue
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
        victims = [int(p) for p in pids if b"loraserve.fetcher" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        if not victims:
            continue  # an empty namespace another run left with the same address: not this pod's
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        return victims
    return []
