"""Defaults and every validation rule of the three models, valid and invalid (the SDK/CLI side of admission)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from loraserve.api import (
    AcceleratorType,
    Deployment,
    DeploymentSpec,
    LoraAddon,
    LoraAddonSpec,
    ModelVersion,
    ModelVersionSpec,
)

BASE = "hf://meta-llama/Llama-3.1-8B-Instruct"
KINDS: dict[str, Any] = {"Deployment": Deployment, "LoraAddon": LoraAddon, "ModelVersion": ModelVersion}


def deployment(**spec: Any) -> DeploymentSpec:
    return DeploymentSpec.model_validate({"baseModel": BASE, **spec})


def test_deployment_defaults() -> None:
    spec = deployment()
    assert spec.min_replicas == 0
    assert spec.effective_max_replicas == 1
    assert (spec.scale_up_window, spec.scale_down_window, spec.scale_to_zero_window) == ("30s", "10m", "1h")
    assert spec.window_seconds() == (30.0, 600.0, 3600.0)
    assert spec.accelerator_type is AcceleratorType.NVIDIA_A100_80GB
    assert spec.effective_accelerator_count == 1
    assert spec.enable_addons is False
    assert spec.max_lora_rank == 16
    assert spec.effective_max_loras == 4


def test_max_replicas_defaults_to_min_when_min_is_set() -> None:
    assert deployment(minReplicas=3).effective_max_replicas == 3


def test_long_prompt_doubles_unset_count() -> None:
    assert deployment(longPrompt=True).effective_accelerator_count == 2
    assert deployment(longPrompt=True, acceleratorCount=4).effective_accelerator_count == 4


def test_live_merge_spec() -> None:
    spec = DeploymentSpec.model_validate({"modelVersion": "support-bot-v2"})
    assert spec.live_merge


@pytest.mark.parametrize(
    "spec",
    [
        {"baseModel": "pvc://models/llama"},
        {"baseModel": "s3://bucket-1/prefix/x"},
        {"baseModel": "https://models.example.com/llama.tar"},
        {"baseModel": "file:///models/llama"},
        {"baseModel": BASE, "minReplicas": 2, "maxReplicas": 2},
        {"baseModel": BASE, "scaleToZeroWindow": "5m"},
        {"baseModel": BASE, "scaleToZeroWindow": "1h30m", "scaleUpWindow": "1.5s", "scaleDownWindow": "0"},
        {"baseModel": BASE, "acceleratorType": "AMD_MI300X_192GB"},
        {"baseModel": BASE, "acceleratorType": "NVIDIA_H100_80GB", "moe": True},
        {"baseModel": BASE, "enableAddons": True, "maxLoras": 16},
        {"baseModel": BASE, "extraArgs": ["--max-model-len=8192", "--gpu-memory-utilization", "0.9"]},
        {"baseModel": BASE, "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}]},
        {"baseModel": BASE, "resources": {"requests": {"cpu": "8", "memory": "64Gi"}}},
    ],
)
def test_valid_deployments(spec: dict[str, Any]) -> None:
    DeploymentSpec.model_validate(spec)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "baseModel"),
        ({"baseModel": BASE, "modelVersion": "x"}, "baseModel"),
        ({"baseModel": "meta-llama/Llama"}, "baseModel"),
        ({"baseModel": "ftp://host/x"}, "baseModel"),
        ({"modelVersion": "x", "enableAddons": True}, "enableAddons"),
        ({"baseModel": BASE, "minReplicas": 3, "maxReplicas": 2}, "maxReplicas"),
        ({"baseModel": BASE, "minReplicas": -1}, "minReplicas"),
        ({"baseModel": BASE, "scaleToZeroWindow": "4m59s"}, "scaleToZeroWindow"),
        ({"baseModel": BASE, "scaleToZeroWindow": "1d"}, "scaleToZeroWindow"),
        ({"baseModel": BASE, "scaleUpWindow": "5 minutes"}, "scaleUpWindow"),
        ({"baseModel": BASE, "scaleDownWindow": "-1s"}, "scaleDownWindow"),
        ({"baseModel": BASE, "scaleDownWindow": "1h 30m"}, "scaleDownWindow"),
        ({"baseModel": BASE, "scaleUpWindow": "3000000h"}, "scaleUpWindow"),
        ({"baseModel": BASE, "acceleratorType": "NVIDIA_T4"}, "acceleratorType"),
        ({"baseModel": BASE, "acceleratorType": "AMD_MI300X_192GB", "moe": True}, "acceleratorType"),
        ({"baseModel": BASE, "acceleratorCount": 3}, "acceleratorCount"),
        ({"baseModel": BASE, "longPrompt": True, "acceleratorCount": 1}, "acceleratorCount"),
        ({"baseModel": BASE, "maxLoraRank": 12}, "maxLoraRank"),
        ({"baseModel": BASE, "maxLoras": 4}, "maxLoras"),
        ({"baseModel": BASE, "extraArgs": ["--port=9000"]}, "extraArgs"),
        ({"baseModel": BASE, "extraArgs": ["--tensor-parallel-size", "2"]}, "extraArgs"),
        ({"baseModel": BASE, "region": "US_East"}, "region"),
        ({"baseModel": BASE, "replicas": "two"}, "replicas"),
        ({"baseModel": BASE, "unknownField": 1}, "unknownField"),
        ({"baseModel": BASE, "env": [{"name": "A"}]}, "env"),
    ],
)
def test_invalid_deployments_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        DeploymentSpec.model_validate(spec)
    assert field in str(excinfo.value)


def addon(targets: list[dict[str, Any]], **spec: Any) -> LoraAddonSpec:
    return LoraAddonSpec.model_validate({"deployment": "llama-multi", "targets": targets, **spec})


def test_addon_valid_and_serverless() -> None:
    spec = addon([{"modelVersion": "a", "weight": 90}, {"modelVersion": "b", "weight": 10}])
    assert [t.weight for t in spec.targets] == [90, 10]
    assert LoraAddonSpec.model_validate({"targets": [{"modelVersion": "a", "weight": 100}]}).deployment is None


def test_addon_rollback_defaults() -> None:
    spec = addon([{"modelVersion": "a", "weight": 100}], autoRollback={"maxErrorRate": 0.1})
    assert spec.auto_rollback is not None
    assert (spec.auto_rollback.window, spec.auto_rollback.min_requests) == ("5m", 20)


@pytest.mark.parametrize(
    ("targets", "extra", "field"),
    [
        ([{"modelVersion": "a", "weight": 90}], {}, "targets"),
        ([{"modelVersion": "a", "weight": 60}, {"modelVersion": "b", "weight": 60}], {}, "targets"),
        ([{"modelVersion": "a", "weight": 50}, {"modelVersion": "a", "weight": 50}], {}, "targets"),
        ([], {}, "targets"),
        ([{"modelVersion": "a", "weight": 101}], {}, "weight"),
        ([{"modelVersion": "A_B", "weight": 100}], {}, "modelVersion"),
        ([{"modelVersion": "a", "weight": 100}], {"autoRollback": {"maxErrorRate": 2}}, "maxErrorRate"),
        ([{"modelVersion": "a", "weight": 100}], {"autoRollback": {"maxErrorRate": 0.1, "window": "1d"}}, "window"),
    ],
)
def test_invalid_addons_name_the_field(targets: list[dict[str, Any]], extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        addon(targets, **extra)
    assert field in str(excinfo.value)


VERSION = {
    "version": "v3",
    "baseModel": {"name": BASE, "revision": "0e9e39f249a16976918f6564b8830bc894c89659"},
    "adapter": {"uri": "s3://adapters/x/v3", "digest": "sha256:" + "a" * 64, "rank": 8},
}


def test_model_version_valid() -> None:
    spec = ModelVersionSpec.model_validate(VERSION)
    assert spec.adapter.rank == 8


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"version": "3"}, "version"),
        ({"version": "v0"}, "version"),
        ({"baseModel": {"name": BASE}}, "revision"),
        ({"adapter": {"uri": "s3://adapters/x", "digest": "md5:abc"}}, "digest"),
        ({"adapter": {"uri": "nowhere"}}, "uri"),
        ({"lineage": {"evalScores": {"f1": "high"}}}, "evalScores"),
        ({"lineage": {"promotedAt": "yesterday"}}, "promotedAt"),
    ],
)
def test_invalid_model_versions_name_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        ModelVersionSpec.model_validate({**VERSION, **patch})
    assert field in str(excinfo.value)


def test_examples_are_valid(repo_root: Path) -> None:
    kinds = []
    for path in sorted((repo_root / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.append(doc["kind"])
            KINDS[doc["kind"]].model_validate(doc)
    assert sorted(set(kinds)) == ["Deployment", "LoraAddon", "ModelVersion"]
    assert kinds.count("ModelVersion") >= 2


def test_round_trip_uses_camel_case() -> None:
    wire = deployment(enableAddons=True).to_wire()
    assert wire["enableAddons"] is True
    assert "enable_addons" not in wire
