"""The `loraserve` CLI and the SDK on the real control plane, run as a person runs them (a subprocess with a
KUBECONFIG): `--dry-run -o yaml` accepted by a server-side dry run; create / get / list / update / scale /
delete with `--wait` progress; ModelVersions from a local adapter directory; load-lora, set-traffic and
rollback on a LoraAddon; refusals shown as field and message with their exit codes; `--wait` on a Deployment
that cannot be scheduled ends with the Stalled reason. Pods here are on fake nodes (the scheduler, the
controllers and the operator are real); completions through the router are the e2e suite's."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.harness import RUN_TOLERATION

from loraserve.cli.commands import ExitCode
from loraserve.digest import directory_digest
from loraserve.local.cluster import LocalCluster
from loraserve.sdk import LLM
from tests.integration.conftest import Operator, wait_for

pytestmark = pytest.mark.cluster
BASE = "hf://meta-llama/Llama-3.1-8B-Instruct"
TINY = "file:///models/tiny"  # never fetched: pods on fake nodes do not run


def loraserve(
    cluster: LocalCluster, command: str, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """`loraserve <command> <args>` as a person types it (`command` split like a shell)."""
    return subprocess.run(
        [sys.executable, "-m", "loraserve.cli.main", *shlex.split(command), *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def kubectl_json(cluster: LocalCluster, namespace: str, *what: str) -> Any:
    result = cluster.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_dry_run_yaml_is_accepted_by_a_server_dry_run(
    cluster: LocalCluster, namespace: str, adapters: dict[str, Path]
) -> None:
    commands = [
        f"create deployment {BASE} --id llama --enable-addons --dry-run",
        "create deployment support-bot-v2 --id merged --accelerator-type NVIDIA_H100_80GB --long-prompt "
        "--min-replica-count 1 --scale-up-window 1m30s --toleration dedicated=llm:NoSchedule --dry-run -o yaml",
        f"create model-version poet-v1 --base {BASE} --base-revision abc123 --adapter {adapters['alpha']} --dry-run",
        "load-lora poet-v1 --deployment llama --dry-run -o yaml",
    ]
    docs = [ok(loraserve(cluster, command, "-n", namespace)).stdout for command in commands]
    assert all(yaml.safe_load(d)["metadata"]["namespace"] == namespace for d in docs)
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input="---\n".join(docs))
    assert applied.stdout.count("(server dry run)") == 4, applied.stdout
    # A dry run creates nothing.
    assert kubectl_json(cluster, namespace, "loraserve")["items"] == []


def test_deployment_lifecycle(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    ns = ["-n", namespace]
    created = ok(
        loraserve(
            cluster,
            f"create deployment {BASE} --id llama --enable-addons --min-replica-count 1 --max-replica-count 2 "
            "--region us-east-1 --wait --timeout 3m",
            *ns,
        )
    )
    assert "call it as model='Llama-3.1-8B-Instruct#llama'" in created.stdout
    # Progress: the state as it went, replicas ready/desired, and the outcome.
    assert "llama: READY · 1/1 ready" in created.stderr, created.stderr
    assert created.stderr.rstrip().endswith("✓ llama: READY · 1/1 ready")

    again = loraserve(cluster, f"create deployment {BASE} --id llama", *ns)
    assert again.returncode == ExitCode.CONFLICT
    assert "already exists" in again.stderr

    shown = ok(loraserve(cluster, "get deployment llama", *ns))
    assert "READY" in shown.stdout
    assert "Llama-3.1-8B-Instruct#llama" in shown.stdout
    assert "Ready=True ReplicasReady" in shown.stdout
    obj = json.loads(ok(loraserve(cluster, f"get lsd accounts/{namespace}/deployments/llama -o json")).stdout)
    assert obj["spec"]["minReplicas"] == 1
    assert "managedFields" not in obj["metadata"]

    # --kubeconfig and --context as kubectl has them (the env's KUBECONFIG is not what is read then).
    context = yaml.safe_load(cluster.kubeconfig.read_text())["current-context"]
    listed = ok(loraserve(cluster, f"--kubeconfig {cluster.kubeconfig} --context {context} list deployments", *ns))
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "STATE", "READY", "ACCELERATOR", "REGION", "MODEL"]
    assert row.split() == [
        "llama",
        "READY",
        "1/1",
        "NVIDIA_A100_80GB",
        "x1",
        "us-east-1",
        "Llama-3.1-8B-Instruct#llama",
    ]
    items = yaml.safe_load(ok(loraserve(cluster, "list deployment -o yaml", *ns)).stdout)["items"]
    assert [i["metadata"]["name"] for i in items] == ["llama"]

    ok(loraserve(cluster, "update deployment llama --max-replica-count 3 --scale-down-window 20m", *ns))
    spec = kubectl_json(cluster, namespace, "lsd", "llama")["spec"]
    assert (spec["maxReplicas"], spec["scaleDownWindow"], spec["minReplicas"]) == (3, "20m", 1)

    scaled = ok(loraserve(cluster, "scale deployment llama --replicas 2 --wait --timeout 3m", *ns))
    assert "scaled Deployment llama to 2 replicas" in scaled.stdout
    assert "✓ llama: READY · 2/2 ready" in scaled.stderr, scaled.stderr

    # Admission refuses what only it can see (region is fixed at creation): the field and the message only.
    refused = loraserve(cluster, "update deployment llama --region eu-west-1", *ns)
    assert refused.returncode == ExitCode.REFUSED
    assert refused.stderr == "spec.region: region is fixed at creation\n"
    # What the API models see is refused before anything is sent, in the same shape.
    refused = loraserve(cluster, f"create deployment {BASE} --id bad --min-replica-count 3 --max-replica-count 1", *ns)
    assert refused.returncode == ExitCode.REFUSED
    assert refused.stderr == "spec.maxReplicas: must be greater than or equal to minReplicas\n"
    assert kubectl_json(cluster, namespace, "lsd", "bad") is None

    deleted = ok(loraserve(cluster, "delete deployment llama --wait --timeout 2m", *ns))
    assert "✓ llama: gone" in deleted.stderr
    missing = loraserve(cluster, "get deployment llama", *ns)
    assert missing.returncode == ExitCode.NOT_FOUND
    assert 'deployments.serving.loraserve.dev "llama" not found' in missing.stderr


def test_wait_ends_with_the_stalled_reason(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    # No node is in region `nowhere`: the pod stays Pending, Unschedulable; the operator says GPUStockout. (The
    # local run pool's taint is tolerated, else a tainted node in the scheduler's message makes it ambiguous.)
    toleration = "{key}={value}:{effect}".format(**RUN_TOLERATION)
    result = loraserve(
        cluster,
        f"create deployment {BASE} --id stuck --min-replica-count 1 --region nowhere --toleration {toleration} "
        "--wait --timeout 2m",
        "-n",
        namespace,
    )
    assert result.returncode == ExitCode.FAILED, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("✗ stuck: FAILED · 0/1 ready · GPUStockout: 0/"), result.stderr
    assert "node(s) didn't match Pod's node affinity/selector" in last, result.stderr
    # The timeout path, on the same object: a new generation that cannot become ready in 1s.
    result = loraserve(cluster, "update deployment stuck --max-replica-count 2 --wait --timeout 1s", "-n", namespace)
    assert result.returncode in (ExitCode.FAILED, ExitCode.TIMEOUT), result.stderr
    assert "stuck: FAILED" in result.stderr or "timed out after 1s" in result.stderr


def test_model_versions_and_lora_traffic(
    cluster: LocalCluster, operator: Operator, namespace: str, adapters: dict[str, Path]
) -> None:
    ns = ["-n", namespace]
    ok(loraserve(cluster, f"create deployment {TINY} --id tiny --enable-addons --wait --timeout 2m", *ns))
    for name, adapter in (("poet-v1", "alpha"), ("poet-v2", "beta")):
        made = ok(loraserve(cluster, f"create model-version {name} --base {TINY} --adapter {adapters[adapter]}", *ns))
        assert f"created ModelVersion {name}" in made.stdout
    spec = kubectl_json(cluster, namespace, "mv", "poet-v1")["spec"]
    assert spec["version"] == "v1"
    assert spec["baseModel"] == {"name": TINY, "revision": "local"}
    assert spec["adapter"] == {
        "uri": adapters["alpha"].resolve().as_uri(),
        "digest": directory_digest(adapters["alpha"]),
        "rank": 8,
    }
    listed = ok(loraserve(cluster, "list model-versions", *ns)).stdout.splitlines()
    assert [line.split()[:2] for line in listed[1:]] == [["poet-v1", "v1"], ["poet-v2", "v2"]]
    assert "poet-v2" in ok(loraserve(cluster, "get mv poet-v2", *ns)).stdout

    loaded = ok(loraserve(cluster, "load-lora poet-v1 --deployment tiny --wait --timeout 2m", *ns))
    assert "loaded addon poet on deployment tiny [poet-v1 100%]: call it as model='poet#tiny'" in loaded.stdout
    assert loraserve(cluster, "load-lora poet-v2 --deployment tiny", *ns).returncode == ExitCode.CONFLICT
    missing = loraserve(cluster, "load-lora poet-v9 --deployment tiny", *ns)
    assert missing.returncode == ExitCode.NOT_FOUND

    def targets() -> list[tuple[str, int]]:
        addon = kubectl_json(cluster, namespace, "addon", "poet")
        return [(t["modelVersion"], t["weight"]) for t in addon["spec"]["targets"]]

    ok(loraserve(cluster, "set-traffic poet v2=90 v1=10", *ns))
    assert targets() == [("poet-v2", 90), ("poet-v1", 10)]
    ok(loraserve(cluster, "rollback poet --to v1", *ns))
    assert targets() == [("poet-v1", 100)]
    refused = loraserve(cluster, "set-traffic poet v2=50 v1=40", *ns)
    assert (refused.returncode, refused.stderr) == (ExitCode.REFUSED, "spec.targets: weights must sum to 100\n")
    assert targets() == [("poet-v1", 100)]
    rows = ok(loraserve(cluster, "list addons", *ns)).stdout.splitlines()
    assert rows[1].split()[:3] == ["poet", "tiny", "poet-v1:100"]

    # No deployment: the operator seats the addon on the serverless pool of the base model.
    serverless = ok(loraserve(cluster, "load-lora poet-v2 --name poet-sl --wait --timeout 2m", *ns))
    assert "ready: addon poet-sl on the serverless pool [poet-v2 100%]: call it as model='poet-sl#serverless-" in (
        serverless.stdout
    )

    ok(loraserve(cluster, "unload-lora poet --deployment tiny", *ns))
    ok(loraserve(cluster, "unload-lora poet-sl", *ns))
    wait_for(lambda: kubectl_json(cluster, namespace, "loraaddons")["items"] == [], timeout=60, message="addons gone")
    assert loraserve(cluster, "unload-lora poet", *ns).returncode == ExitCode.NOT_FOUND


def test_sdk_apply_is_idempotent_and_waits(cluster: LocalCluster, operator: Operator, namespace: str) -> None:
    common: dict[str, Any] = {"namespace": namespace, "kubeconfig": cluster.kubeconfig, "timeout": 120}
    base = LLM(TINY, "on-demand", id="sdk-base", enable_addons=True, **common).apply()
    assert base.state == "SCALED_TO_ZERO"  # minReplicas 0: Ready at zero, the first request wakes it
    generation = kubectl_json(cluster, namespace, "lsd", "sdk-base")["metadata"]["generation"]
    LLM(TINY, "on-demand", id="sdk-base", enable_addons=True, **common).apply()
    assert kubectl_json(cluster, namespace, "lsd", "sdk-base")["metadata"]["generation"] == generation
    LLM(TINY, "on-demand", id="sdk-base", enable_addons=True, max_replicas=2, **common).apply()
    assert kubectl_json(cluster, namespace, "lsd", "sdk-base")["spec"]["maxReplicas"] == 2

    ok(loraserve(cluster, f"create model-version sdk-v1 --base {TINY} --adapter s3://bucket/sdk/v1 -n {namespace}"))
    lora = LLM("sdk-v1", "on-demand-lora", base_id="sdk-base", **common).apply()
    assert lora.id == "sdk"
    assert lora.state == "PENDING"  # no replica yet: it loads on each replica as it becomes ready
    assert lora.router_model == f"sdk#accounts/{namespace}/deployments/sdk-base"

    lora.delete(wait=True, timeout=60)
    base.delete(wait=True, timeout=120)
    assert lora.state is None
    assert base.state is None
