"""The pure manifest builders: what a replica of each kind of Deployment looks like."""

from __future__ import annotations

from typing import Any

from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.resources.model_server import build_deployment, build_service, desired_replicas
from loraserve.resources.settings import ManifestSettings

SETTINGS = ManifestSettings()
BASE = "hf://meta-llama/Llama-3.1-8B-Instruct"


def pod(spec: dict[str, Any], merge: ModelVersionSpec | None = None) -> dict[str, Any]:
    manifest = build_deployment("pool", "ns", "uid-1", DeploymentSpec.model_validate(spec), SETTINGS, merge)
    result: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return result


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def test_multi_lora_flags_and_fetcher_sidecar() -> None:
    spec = pod({"baseModel": BASE, "enableAddons": True, "maxLoras": 8, "maxLoraRank": 32})
    args = container(spec, "vllm")["args"]
    assert "--enable-lora" in args
    assert "--max-loras=8" in args
    assert "--max-lora-rank=32" in args
    assert [c["name"] for c in spec["containers"]] == ["vllm", "adapter-fetcher"]
    env = {e["name"]: e.get("value") for e in container(spec, "vllm")["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_plain_deployment_has_no_lora_flags_or_sidecar() -> None:
    spec = pod({"baseModel": BASE})
    assert not any(a.startswith("--enable-lora") for a in container(spec, "vllm")["args"])
    assert [c["name"] for c in spec["containers"]] == ["vllm"]


def test_tensor_parallel_and_gpu_resources_follow_the_accelerator() -> None:
    spec = pod({"baseModel": BASE, "acceleratorType": "AMD_MI300X_192GB", "longPrompt": True})
    vllm = container(spec, "vllm")
    assert "--tensor-parallel-size=2" in vllm["args"]
    assert vllm["resources"]["limits"] == {"amd.com/gpu": 2}
    assert spec["nodeSelector"] == {"serving.loraserve.dev/accelerator": "AMD_MI300X_192GB"}
    assert spec["tolerations"][0]["key"] == "amd.com/gpu"


def test_region_pins_nodes() -> None:
    spec = pod({"baseModel": BASE, "region": "eu-west-1", "acceleratorCount": 4})
    assert spec["nodeSelector"]["topology.kubernetes.io/region"] == "eu-west-1"
    assert container(spec, "vllm")["resources"]["requests"]["nvidia.com/gpu"] == 4


def test_restricted_pod_security() -> None:
    spec = pod({"baseModel": BASE, "enableAddons": True})
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}


def test_secrets_by_reference_only() -> None:
    spec = pod({"baseModel": BASE, "credentialsSecret": "hf", "env": [{"name": "X", "value": "1"}]})
    for c in spec["containers"] + spec["initContainers"]:
        for e in c["env"]:
            if e["name"] == "HF_TOKEN":
                assert "value" not in e
                assert e["valueFrom"]["secretKeyRef"]["name"] == "hf"


def test_pvc_model_is_mounted_not_downloaded() -> None:
    spec = pod({"baseModel": "pvc://weights/llama-8b"})
    assert spec["initContainers"] == []
    assert spec["volumes"][0] == {"name": "models", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
    assert "--model=/models/llama-8b" in container(spec, "vllm")["args"]


def test_live_merge_runs_merge_step_and_serves_merged_weights() -> None:
    version = ModelVersionSpec.model_validate(
        {
            "version": "v2",
            "baseModel": {"name": BASE, "revision": "abc"},
            "adapter": {"uri": "s3://adapters/bot/v2", "digest": "sha256:" + "0" * 64},
            "systemPrompt": "Be brief.",
        }
    )
    spec = pod({"modelVersion": "bot-v2"}, version)
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-base-model", "merge-adapter"]
    merge = spec["initContainers"][1]["args"]
    assert merge[0] == "merge"
    assert "--adapter-uri=s3://adapters/bot/v2" in merge
    vllm = container(spec, "vllm")
    assert "--model=/models/merged" in vllm["args"]
    assert "--served-model-name=pool" in vllm["args"]
    assert not any(a.startswith("--enable-lora") for a in vllm["args"])
    assert {"name": "LORASERVE_SYSTEM_PROMPT", "value": "Be brief."} in vllm["env"]


def test_replicas_follow_scale_within_bounds() -> None:
    assert desired_replicas(DeploymentSpec.model_validate({"baseModel": BASE})) == 0
    assert desired_replicas(DeploymentSpec.model_validate({"baseModel": BASE, "minReplicas": 2})) == 2
    assert desired_replicas(DeploymentSpec.model_validate({"baseModel": BASE, "replicas": 9, "maxReplicas": 3})) == 3
    assert desired_replicas(DeploymentSpec.model_validate({"baseModel": BASE, "replicas": 0, "minReplicas": 1})) == 1


def test_rollout_never_drops_capacity_and_changes_hash() -> None:
    a = build_deployment("pool", "ns", "u", DeploymentSpec.model_validate({"baseModel": BASE}), SETTINGS)
    b = build_deployment(
        "pool", "ns", "u", DeploymentSpec.model_validate({"baseModel": BASE, "acceleratorCount": 2}), SETTINGS
    )
    assert a["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    key = "serving.loraserve.dev/spec-hash"
    assert a["metadata"]["annotations"][key] != b["metadata"]["annotations"][key]
    assert a["metadata"]["ownerReferences"][0]["uid"] == "u"


def test_service_selects_the_pods() -> None:
    spec = DeploymentSpec.model_validate({"baseModel": BASE, "enableAddons": True})
    svc = build_service("pool", "ns", "u", spec, SETTINGS)
    dep = build_deployment("pool", "ns", "u", spec, SETTINGS)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [p["name"] for p in svc["spec"]["ports"]] == ["http"]  # the fetcher is not published


def test_extra_tolerations_pass_through() -> None:
    spec = pod({"baseModel": BASE, "tolerations": [{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}]})
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},
    ]
