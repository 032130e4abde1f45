"""Python refuses what admission refuses, naming the same field: every refusal of the admission corpus
(tests/integration/admission/invalid, which the real API server must refuse) checked against the models the
SDK, the CLI and the operator use. The cross-field rules are written once (CrossFieldRule) for both."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from loraserve.api.addon import ADDON_RULES, LoraAddonSpec
from loraserve.api.crd import all_crds
from loraserve.api.deployment import DEPLOYMENT_RULES, DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec

CORPUS = sorted((Path(__file__).parents[1] / "integration" / "admission" / "invalid").glob("*.yaml"))
MODELS = {"Deployment": DeploymentSpec, "LoraAddon": LoraAddonSpec, "ModelVersion": ModelVersionSpec}


def expected_field(path: Path) -> str:
    found = re.search(r"^# expect: (.+)$", path.read_text(), re.MULTILINE)
    assert found, path.name
    return found.group(1).strip()


def admission_only(path: Path) -> bool:
    """What only admission sees: the object's name, or the stored object (an edit: more than one document)."""
    return expected_field(path).startswith("metadata.") or len(list(yaml.safe_load_all(path.read_text()))) > 1


SPEC_CASES = [p for p in CORPUS if not admission_only(p)]


def test_what_only_admission_sees() -> None:
    assert sorted(p.stem for p in CORPUS if admission_only(p)) == [
        "dep-name-not-dns1035",
        "dep-name-too-long",
        "dep-region-change",
        "mv-edit-adapter",
        "mv-edit-system-prompt",
    ]


@pytest.mark.parametrize("path", SPEC_CASES, ids=[p.stem for p in SPEC_CASES])
def test_python_refuses_what_admission_refuses(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    with pytest.raises(ValidationError) as refused:
        MODELS[doc["kind"]].model_validate(doc.get("spec") or {})
    # "spec.targets[0].weight" -> "weight"; 'unknown field "spec.gpuType"' -> "gpuType"
    leaf = re.split(r"[.\[\]\" ]+", expected_field(path).rstrip('"]'))[-1]
    assert leaf in str(refused.value), f"{path.name}: {refused.value}"


def test_each_cross_field_rule_is_in_the_crd_once() -> None:
    schemas = {
        crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for crd in all_crds().values()
    }
    for kind, rules in (("Deployment", DEPLOYMENT_RULES), ("LoraAddon", ADDON_RULES)):
        written = schemas[kind]["properties"]["spec"]["x-kubernetes-validations"]
        assert [(r["rule"], r["message"], r.get("fieldPath")) for r in written] == [
            (r.rule, r.message, r.field) for r in rules
        ]


def test_python_messages_are_the_cel_messages() -> None:
    spec = {"baseModel": "hf://org/m", "minReplicas": 3, "maxReplicas": 2}
    with pytest.raises(ValidationError, match="maxReplicas: must be greater than or equal to minReplicas"):
        DeploymentSpec.model_validate(spec)
