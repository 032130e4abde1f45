"""The `LoraAddon` CRD: a named, routable fine-tune on a Deployment (or the serverless pool)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from loraserve.api.common import (
    API_VERSION,
    DNS1123_PATTERN,
    ApiModel,
    Condition,
    cel,
    check_duration,
    duration_field,
)

MAX_TARGETS = 10


class AddonState(StrEnum):
    PENDING = "PENDING"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


class AddonTarget(ApiModel):
    model_version: str = Field(
        description="A ModelVersion in the same namespace.", pattern=DNS1123_PATTERN, max_length=253
    )
    weight: int = Field(description="Percent of this addon's traffic (all weights sum to 100).", ge=0, le=100)


class AutoRollback(ApiModel):
    """Flip traffic back to the previous targets when the new version misbehaves."""

    max_error_rate: float = Field(
        description="Error fraction (0-1) over the window that triggers rollback.", ge=0, le=1
    )
    window: str = duration_field("5m", "Go duration the error rate is measured over.")
    min_requests: int = Field(20, description="Requests needed in the window before the rule can fire.", ge=1)

    @field_validator("window")
    @classmethod
    def _go_duration(cls, value: str) -> str:
        return check_duration(value)


class LoraAddonSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("self.targets.map(t, t.weight).sum() == 100", "targets weights must sum to 100", ".targets"),
            ]
        }
    )

    deployment: str | None = Field(
        None,
        description="The Deployment (same namespace, enableAddons) that serves this addon. Empty: the shared "
        "serverless pool of the addon's base model.",
        pattern=DNS1123_PATTERN,
        max_length=40,
    )
    targets: list[AddonTarget] = Field(
        description="ModelVersions and their traffic weights. Rollback is a flip of these weights.",
        min_length=1,
        max_length=MAX_TARGETS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["modelVersion"]},
    )
    auto_rollback: AutoRollback | None = Field(None, description="Optional automatic rollback rule.")

    @model_validator(mode="after")
    def _weights(self) -> LoraAddonSpec:
        if sum(t.weight for t in self.targets) != 100:
            raise ValueError("targets: weights must sum to 100")
        names = [t.model_version for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("targets: each modelVersion may appear once")
        return self


class LoraAddonStatus(ApiModel):
    observed_generation: int | None = Field(None, description="The spec generation this status describes.")
    state: AddonState | None = Field(None, description="PENDING, LOADING, READY, FAILED or UNLOADED.")
    message: str | None = Field(None, description="Why the addon is in this state.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling and Stalled (kstatus).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    deployment: str | None = Field(None, description="The Deployment actually serving the addon.")
    versions: str | None = Field(None, description="Targets as text, e.g. v1:90,v2:10.")
    loaded_replicas: int | None = Field(None, description="Ready replicas that have every target loaded.")
    total_replicas: int | None = Field(None, description="Ready replicas of the Deployment.")
    last_request_time: datetime | None = Field(None, description="Last request for this addon (idle clock).")
    loaded_at: datetime | None = Field(None, description="When an idle-unloaded addon was loaded again.")
    served_names: list[str] = Field(default_factory=list, description="Adapter names vLLM serves it under.")
    retired: dict[str, str] = Field(
        default_factory=dict, description="Versions taken out of the targets, kept loaded (warm) until a grace ends."
    )


class LoraAddon(ApiModel):
    """A routable fine-tune: `model="<addon>#<deployment>"`."""

    api_version: Literal["serving.loraserve.dev/v1alpha1"] = API_VERSION
    kind: Literal["LoraAddon"] = "LoraAddon"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: LoraAddonSpec
    status: LoraAddonStatus | None = None
