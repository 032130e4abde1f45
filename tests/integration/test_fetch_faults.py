"""An adapter whose URI vanishes, on a real vLLM replica: its addon fails with a status that names the
artifact and the class of failure (nothing of the source's own text), while the replica, its base model and
the other addon keep serving; when the files come back the addon loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from e2e.harness import RUN_POOL_PLACEMENT

from loraserve.api.naming import base_model_name
from loraserve.digest import directory_digest
from loraserve.local.cluster import LocalCluster
from tests.integration.conftest import Operator
from tests.integration.test_addons_vllm import addon, apply, complete, replica_ips, version, wait_state

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.slow]
API = "serving.loraserve.dev/v1alpha1"


def test_an_adapter_uri_that_vanishes(
    cluster: LocalCluster,
    operator: Operator,
    run_pool: str,
    namespace: str,
    tiny_model: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    ns = namespace
    base = f"file://{tiny_model}"
    spec = {
        "baseModel": base,
        "enableAddons": True,
        "maxLoras": 4,
        "maxLoraRank": 16,
        "minReplicas": 1,
        **RUN_POOL_PLACEMENT,
    }
    apply(cluster, ns, {"apiVersion": API, "kind": "Deployment", "metadata": {"name": "tiny"}, "spec": spec})
    wait_state(cluster, ns, "lsd", "tiny", "READY", timeout=400)
    (ip,) = replica_ips(cluster, ns)
    base_text = complete(ip, base_model_name(base))

    # A copy of an adapter that will be gone by the time the addon asks for it.
    doomed = tmp_path / "doomed-adapter"
    shutil.copytree(adapters["beta"], doomed)
    doomed_version = version("lost-v1", "v1", base, doomed, rank=8)
    assert doomed_version["spec"]["adapter"]["digest"] == directory_digest(adapters["beta"])
    apply(cluster, ns, version("chat-v1", "v1", base, adapters["alpha"], rank=8), addon("chat", ("chat-v1", 100)))
    wait_state(cluster, ns, "addon", "chat", "READY")
    chat = complete(ip, "chat-v1")

    shutil.rmtree(doomed)
    apply(cluster, ns, doomed_version, addon("lost", ("lost-v1", 100)))
    lost = wait_state(cluster, ns, "addon", "lost", "FAILED")
    stalled = next(c for c in lost["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True"
    assert stalled["reason"] == "AdapterSourceUnavailable"
    assert stalled["message"].startswith("lost-v1 on ")  # the artifact, on which replica
    assert str(doomed) in stalled["message"]
    assert "no such file or directory" in stalled["message"]

    # Nothing else harmed: the replica, its base model and the other addon serve as before.
    assert wait_state(cluster, ns, "addon", "chat", "READY")["loadedReplicas"] == 1
    assert complete(ip, "chat-v1") == chat
    assert complete(ip, base_model_name(base)) == base_text
    assert wait_state(cluster, ns, "lsd", "tiny", "READY")

    # The files come back: the addon's retries (with backoff) find them, and it loads.
    shutil.copytree(adapters["beta"], doomed)
    wait_state(cluster, ns, "addon", "lost", "READY", timeout=180)
    assert complete(ip, "lost-v1") != chat
