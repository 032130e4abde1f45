"""The `LoraAddon` CRD: a named, routable fine-tune on a Deployment (or the serverless pool)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from loraserve.api.common import (
    API_VERSION,
    DNS1123_PATTERN,
    ApiModel,
    Condition,
    CrossFieldRule,
    check_duration,
    check_rules,
    duration_field,
    validations,
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
    weight: StrictInt = Field(description="Percent of this addon's traffic (all weights sum to 100).", ge=0, le=100)


# Re-arms a fired automatic rollback: set it to a new value (any text, e.g. a timestamp) to route by the spec's
# weights again without editing the spec. A new spec generation re-arms it as well.
REARM_ANNOTATION = "serving.loraserve.dev/rearm-rollback"


class SystemPromptPolicy(StrEnum):
    PREPEND = "prepend"
    REPLACE = "replace"
    KEEP_USER = "keepUser"


class AutoRollback(ApiModel):
    """Move all traffic to the control version when another version misbehaves (status only, never the spec)."""

    control: str | None = Field(
        None,
        description="The ModelVersion (one of the targets) that is control: traffic goes back to it on rollback, "
        "and the others are compared with it. Empty: the target with the largest weight (the first one listed "
        "on a tie). status.autoRollback.control names the one in use.",
        pattern=DNS1123_PATTERN,
        max_length=253,
    )
    max_error_rate: StrictFloat = Field(
        description="Error fraction (0-1; HTTP 5xx answers, the router's own included) of a non-control version "
        "over the window that triggers rollback, when it is also above control's error rate.",
        ge=0,
        le=1,
    )
    max_ttft_p95_ratio: StrictFloat | None = Field(
        None,
        description="Optional: roll back when a non-control version's p95 time to first token over the window is "
        "more than this many times control's (control needs minRequests too).",
        ge=1,
        le=1000,
    )
    max_latency_p95_ratio: StrictFloat | None = Field(
        None,
        description="Optional: roll back when a non-control version's p95 request latency over the window is "
        "more than this many times control's (control needs minRequests too).",
        ge=1,
        le=1000,
    )
    window: str = duration_field("5m", "Go duration the error rate and latencies are measured over.")
    min_requests: StrictInt = Field(
        20, description="Requests a version needs in the window before the rule judges it.", ge=1
    )

    @field_validator("window")
    @classmethod
    def _go_duration(cls, value: str) -> str:
        return check_duration(value)


ADDON_RULES = (
    CrossFieldRule(
        "self.targets.map(t, t.weight).sum() == 100",
        "weights must sum to 100",
        ".targets",
        lambda s: sum(t.weight for t in s.targets) == 100,
    ),
    CrossFieldRule(
        "!has(self.autoRollback) || !has(self.autoRollback.control) || "
        "self.targets.exists(t, t.modelVersion == self.autoRollback.control)",
        "must be one of the targets' modelVersion",
        ".autoRollback.control",
        lambda s: (
            not (s.auto_rollback and s.auto_rollback.control)
            or s.auto_rollback.control in {t.model_version for t in s.targets}
        ),
    ),
)


class LoraAddonSpec(ApiModel):
    model_config = ConfigDict(json_schema_extra=validations(ADDON_RULES))

    deployment: str | None = Field(
        None,
        description="The Deployment (same namespace, enableAddons) that serves this addon. Empty: the shared "
        "serverless pool of the addon's base model.",
        pattern=DNS1123_PATTERN,
        max_length=40,
    )
    targets: list[AddonTarget] = Field(
        description="ModelVersions and their traffic weights: 1 to 10, each version once, weights summing to 100. "
        "Rollback is a flip of these weights.",
        min_length=1,
        max_length=MAX_TARGETS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["modelVersion"]},
    )
    auto_rollback: AutoRollback | None = Field(
        None,
        description="Optional automatic rollback rule. When it fires the operator routes all traffic to control "
        "through status.effectiveTargets (the spec is never written); a new spec generation or a new value of "
        f"the annotation {REARM_ANNOTATION} re-arms it.",
    )
    system_prompt_policy: SystemPromptPolicy = Field(
        SystemPromptPolicy.PREPEND,
        description="Chat requests routed to a version with a systemPrompt: prepend (the version's system message "
        "first, the client's messages after it), replace (the client's system messages are dropped) or keepUser "
        "(the version's prompt only when the client sent no system message).",
    )

    @model_validator(mode="after")
    def _weights(self) -> LoraAddonSpec:
        check_rules(self, ADDON_RULES)
        names = [t.model_version for t in self.targets]
        if len(set(names)) != len(names):  # admission: the list-map key (x-kubernetes-list-map-keys)
            raise ValueError("targets: each modelVersion may appear once")
        return self

    def control(self) -> str:
        """The control ModelVersion: autoRollback.control, else the largest weight (first listed on a tie)."""
        if self.auto_rollback and self.auto_rollback.control:
            return self.auto_rollback.control
        return max(self.targets, key=lambda t: t.weight).model_version  # max keeps the first on a tie


class RollbackStatus(ApiModel):
    control: str | None = Field(None, description="The control ModelVersion the rule compares with.")
    rolled_back: bool = Field(False, description="Whether the rule fired for this generation of the spec.")
    generation: int | None = Field(None, description="The spec generation the rollback applies to.")
    rearm: str | None = Field(None, description="The re-arm annotation's value when it fired.")
    model_version: str | None = Field(None, description="The version rolled back.")
    metric: str | None = Field(None, description="errorRate, ttftP95 or latencyP95.")
    value: float | None = Field(None, description="The version's value over the window.")
    control_value: float | None = Field(None, description="Control's value over the window.")
    threshold: float | None = Field(None, description="The limit it crossed.")
    requests: int | None = Field(None, description="The version's requests in the window.")
    at: datetime | None = Field(None, description="When it fired.")
    reason: str | None = Field(None, description="ErrorRateExceeded, TtftP95Exceeded or LatencyP95Exceeded.")
    message: str | None = Field(None, description="What fired, in words.")


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
    effective_targets: list[AddonTarget] = Field(
        default_factory=list,
        description="The weights the router routes by: the spec's, or all to control after an automatic rollback.",
    )
    auto_rollback: RollbackStatus | None = Field(None, description="The automatic rollback rule's state.")


class LoraAddon(ApiModel):
    """A routable fine-tune: `model="<addon>#<deployment>"`."""

    api_version: Literal["serving.loraserve.dev/v1alpha1"] = API_VERSION
    kind: Literal["LoraAddon"] = "LoraAddon"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: LoraAddonSpec
    status: LoraAddonStatus | None = None
