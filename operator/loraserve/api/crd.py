"""Renders the three CustomResourceDefinitions from the pydantic models (the single source of truth).

pydantic's JSON schema is turned into a Kubernetes *structural* schema: $refs inlined, `anyOf [X, null]`
collapsed to X, titles and `additionalProperties: false` dropped (unknown fields are refused by the
apiserver's strict field validation instead), and the `x-kubernetes-*` extensions kept as written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from loraserve.api.addon import LoraAddonSpec, LoraAddonStatus
from loraserve.api.common import CATEGORY, DNS1035_PATTERN, GROUP, VERSION
from loraserve.api.deployment import DeploymentSpec, DeploymentStatus
from loraserve.api.modelversion import ModelVersionSpec, ModelVersionStatus

Schema = dict[str, Any]
_DROP = {"title", "$defs"}
_ORDER = {k: i for i, k in enumerate(["type", "description", "required", "properties", "items"])}


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: list[str]
    description: str
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: list[dict[str, Any]]
    max_name_length: int
    scale: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


KINDS: list[Kind] = [
    Kind(
        kind="Deployment",
        plural="deployments",
        short_names=["lsdeploy", "lsd"],
        description="A pool of GPU replicas running vLLM for one base model (multi-LoRA) or one merged fine-tune.",
        spec=DeploymentSpec,
        status=DeploymentStatus,
        columns=[
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
            {"name": "Accelerator", "type": "string", "jsonPath": ".status.accelerator"},
            _age(),
        ],
        # Names become Service and pod names, with room for suffixes.
        max_name_length=40,
        scale=True,
    ),
    Kind(
        kind="LoraAddon",
        plural="loraaddons",
        short_names=["addon", "lora"],
        description='A named, routable fine-tune: model="<addon>#<deployment>".',
        spec=LoraAddonSpec,
        status=LoraAddonStatus,
        columns=[
            {"name": "Deployment", "type": "string", "jsonPath": ".status.deployment"},
            {"name": "Versions", "type": "string", "jsonPath": ".status.versions"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "RolledBack", "type": "string", "jsonPath": ".status.autoRollback.modelVersion"},
            {"name": "Loaded", "type": "integer", "jsonPath": ".status.loadedReplicas", "priority": 1},
            _age(),
        ],
        # The served adapter name is <addon>-<version>.
        max_name_length=48,
    ),
    Kind(
        kind="ModelVersion",
        plural="modelversions",
        short_names=["mv", "modelver"],
        description="An immutable, numbered LoRA adapter artifact pinned to an exact base model, with lineage.",
        spec=ModelVersionSpec,
        status=ModelVersionStatus,
        columns=[
            {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
            {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel.name"},
            {"name": "Adapter", "type": "string", "jsonPath": ".spec.adapter.uri"},
            {"name": "State", "type": "string", "jsonPath": ".status.state", "priority": 1},
            _age(),
        ],
        max_name_length=48,
    ),
]


def _structural(node: Any, defs: Schema) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # Siblings of $ref (description, default) win over the referenced definition's own.
        target.update(node)
        node = target
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        node = {**_structural(inner, defs), **node}
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b != {"type": "null"}]
        if len(branches) == 1:
            del node["anyOf"]
            node = {**_structural(branches[0], defs), **node}
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            merged = _structural(value, defs)
            # Field-level json_schema_extra may add to items (e.g. maxLength of each string).
            out[key] = {**out.get(key, {}), **merged} if isinstance(merged, dict) else merged
        else:
            out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
    # type and description first: easier to read in the generated YAML and in `kubectl explain`.
    return {k: out[k] for k in sorted(out, key=lambda k: (_ORDER.get(k, len(_ORDER)), 0))}


def model_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema: Schema = _structural(raw, defs)
    return schema


def crd(kind: Kind) -> Schema:
    spec = model_schema(kind.spec)
    spec["description"] = kind.description
    status = model_schema(kind.status)
    status["description"] = "Observed state, written by the operator."
    root: Schema = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": kind.max_name_length,
                        # DNS-1035: the name becomes Service and pod names.
                        "pattern": DNS1035_PATTERN,
                    }
                },
            },
            "spec": spec,
            "status": status,
        },
    }
    subresources: Schema = {"status": {}}
    if kind.scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "loraserve"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": kind.short_names,
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": subresources,
                    "additionalPrinterColumns": kind.columns,
                }
            ],
        },
    }


def all_crds() -> dict[str, Schema]:
    """File name -> CRD document, for every kind."""
    return {f"{GROUP}_{k.plural}.yaml": crd(k) for k in KINDS}
