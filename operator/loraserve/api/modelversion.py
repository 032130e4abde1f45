"""The `ModelVersion` CRD: an immutable, numbered fine-tune artifact and its lineage."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field, StrictFloat, StrictInt

from loraserve.api.common import (
    API_VERSION,
    MODEL_URI_DESCRIPTION,
    MODEL_URI_PATTERN,
    ApiModel,
    Condition,
    cel,
)

DIGEST_PATTERN = r"^sha256:[a-f0-9]{64}$"


class VersionState(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


class BaseModelPin(ApiModel):
    name: str = Field(description=MODEL_URI_DESCRIPTION, pattern=MODEL_URI_PATTERN, max_length=512)
    revision: str = Field(
        description="Exact revision of the base: a commit hash or sha256 digest.",
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.:]*$",
        max_length=128,
    )


class Adapter(ApiModel):
    uri: str = Field(
        description="Where the adapter (peft format) is. " + MODEL_URI_DESCRIPTION,
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
    )
    digest: str | None = Field(
        None,
        description="sha256 over the adapter files (sorted by path, name and content); a replica refuses "
        "files that do not match.",
        pattern=DIGEST_PATTERN,
    )
    rank: StrictInt | None = Field(None, description="LoRA rank r of the adapter.", ge=1, le=512)


class Lineage(ApiModel):
    dataset_hash: str | None = Field(None, description="Digest of the training data.", max_length=256)
    hyperparameters: dict[str, str] = Field(default_factory=dict, description="Training hyperparameters.")
    eval_scores: dict[str, StrictFloat] = Field(default_factory=dict, description="Evaluation scores by name.")
    promoted_at: datetime | None = Field(None, description="When this version was promoted.")
    registry_uri: str | None = Field(None, description="Where the version is recorded upstream.", max_length=1024)


class ModelVersionSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self == oldSelf",
                    "ModelVersion spec is immutable: create a new ModelVersion",
                    reason="FieldValueForbidden",
                ),
            ]
        }
    )

    version: str = Field(description="Version label: v1, v2, ...", pattern=r"^v[1-9][0-9]*$", max_length=16)
    base_model: BaseModelPin = Field(description="The exact base model the adapter was trained on.")
    adapter: Adapter = Field(description="The LoRA adapter.")
    lineage: Lineage | None = Field(None, description="How the adapter was made.")
    system_prompt: str | None = Field(None, description="System prompt pinned to this version.", max_length=32768)


class ModelVersionStatus(ApiModel):
    observed_generation: int | None = Field(None, description="The spec generation this status describes.")
    state: VersionState | None = Field(None, description="PENDING, READY or FAILED.")
    message: str | None = Field(None, description="Why the version is in this state.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling and Stalled (kstatus).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class ModelVersion(ApiModel):
    """An immutable, numbered adapter artifact pinned to an exact base model."""

    api_version: Literal["serving.loraserve.dev/v1alpha1"] = API_VERSION
    kind: Literal["ModelVersion"] = "ModelVersion"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: ModelVersionSpec
    status: ModelVersionStatus | None = None
