"""The `Deployment` CRD: a pool of GPU replicas running vLLM for one base model."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from loraserve.api.common import (
    API_VERSION,
    DNS1123_PATTERN,
    MODEL_URI_DESCRIPTION,
    MODEL_URI_PATTERN,
    ApiModel,
    Condition,
    CrossFieldRule,
    EnvVar,
    cel,
    check_duration,
    check_rules,
    duration_field,
    validations,
)
from loraserve.durations import MINUTE, SECOND, parse_duration

MIN_SCALE_TO_ZERO_WINDOW = "5m"
# Flags the operator sets itself; letting extraArgs repeat them would make the pod spec lie.
RESERVED_VLLM_FLAGS = (
    "--model",
    "--port",
    "--host",
    "--served-model-name",
    "--enable-lora",
    "--max-loras",
    "--max-lora-rank",
    "--tensor-parallel-size",
)


class AcceleratorType(StrEnum):
    NVIDIA_A100_80GB = "NVIDIA_A100_80GB"
    NVIDIA_H100_80GB = "NVIDIA_H100_80GB"
    AMD_MI300X_192GB = "AMD_MI300X_192GB"


class DeploymentState(StrEnum):
    CREATING = "CREATING"
    READY = "READY"
    UPDATING = "UPDATING"
    SCALED_TO_ZERO = "SCALED_TO_ZERO"
    FAILED = "FAILED"
    DELETING = "DELETING"


class ResourceList(ApiModel):
    model_config = ConfigDict(extra="forbid")
    cpu: str | None = Field(None, description="CPU quantity, e.g. 8 or 7500m.", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: str | None = Field(
        None, description="Memory quantity, e.g. 64Gi.", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
    )
    ephemeral_storage: str | None = Field(
        None,
        alias="ephemeral-storage",
        description="Scratch disk for downloaded weights, e.g. 200Gi.",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$",
    )


class Toleration(ApiModel):
    """A pod toleration (core/v1), for GPU nodes with taints of their own."""

    key: str | None = Field(
        None, description="Taint key; empty with operator Exists matches every taint.", max_length=316
    )
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value (operator Equal).", max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; empty matches every effect."
    )
    toleration_seconds: StrictInt | None = Field(None, description="For NoExecute: how long the pod stays bound.")


class Resources(ApiModel):
    """CPU, memory and disk for the model server. GPUs come from acceleratorType/acceleratorCount."""

    requests: ResourceList | None = Field(None, description="Guaranteed amounts.")
    limits: ResourceList | None = Field(None, description="Upper bounds.")


DEPLOYMENT_RULES = (
    CrossFieldRule(
        "has(self.baseModel) != has(self.modelVersion)",
        "set exactly one of baseModel (multi-LoRA or plain) or modelVersion (live merge)",
        ".baseModel",
        lambda s: (s.base_model is None) != (s.model_version is None),
    ),
    CrossFieldRule(
        "!has(self.modelVersion) || !self.enableAddons",
        "a live-merge deployment (modelVersion) cannot also enableAddons",
        ".enableAddons",
        lambda s: s.model_version is None or not s.enable_addons,
    ),
    CrossFieldRule(
        "!has(self.maxReplicas) || self.maxReplicas >= self.minReplicas",
        "must be greater than or equal to minReplicas",
        ".maxReplicas",
        lambda s: s.max_replicas is None or s.max_replicas >= s.min_replicas,
    ),
    CrossFieldRule(
        "!(self.acceleratorType == 'AMD_MI300X_192GB' && self.moe)",
        "AMD_MI300X_192GB does not serve mixture-of-experts models (moe: true)",
        ".acceleratorType",
        lambda s: not (s.accelerator_type is AcceleratorType.AMD_MI300X_192GB and s.moe),
    ),
    CrossFieldRule(
        "!self.longPrompt || !has(self.acceleratorCount) || self.acceleratorCount >= 2",
        "longPrompt needs acceleratorCount of at least 2",
        ".acceleratorCount",
        lambda s: not s.long_prompt or s.accelerator_count is None or s.accelerator_count >= 2,
    ),
    CrossFieldRule(
        "has(self.region) == has(oldSelf.region) && (!has(self.region) || self.region == oldSelf.region)",
        "region is fixed at creation",
        ".region",
        None,  # a transition rule: only admission sees the old object
    ),
    CrossFieldRule(
        "!has(self.maxLoras) || self.enableAddons",
        "only applies with enableAddons",
        ".maxLoras",
        lambda s: s.max_loras is None or s.enable_addons,
    ),
)


class DeploymentSpec(ApiModel):
    model_config = ConfigDict(json_schema_extra=validations(DEPLOYMENT_RULES))

    base_model: str | None = Field(
        None,
        description=MODEL_URI_DESCRIPTION + " Exactly one of baseModel and modelVersion.",
        pattern=MODEL_URI_PATTERN,
        max_length=512,
    )
    model_version: str | None = Field(
        None,
        description="Live merge: the name of a ModelVersion (same namespace) whose adapter is merged into its "
        "pinned base model's weights when a replica starts (exactly, or refused with the reason). The replica "
        "then serves one fine-tune with no adapter overhead.",
        pattern=DNS1123_PATTERN,
        max_length=253,
    )
    moe: StrictBool = Field(
        False, description="The base model is a mixture-of-experts model (AMD_MI300X refuses them)."
    )
    enable_addons: StrictBool = Field(
        False, description="Multi-LoRA: start vLLM with --enable-lora so LoraAddons load at run time."
    )
    max_loras: StrictInt | None = Field(
        None,
        description="Adapters held in GPU memory at once (vLLM --max-loras; default 4). Only with enableAddons.",
        ge=1,
        le=256,
    )
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="Largest adapter rank accepted (vLLM --max-lora-rank)."
    )
    replicas: StrictInt | None = Field(
        None,
        description="Desired replicas, written by the autoscaler (or kubectl scale) through the scale "
        "subresource; the operator keeps the replicas within [minReplicas, maxReplicas].",
        ge=0,
    )
    min_replicas: StrictInt = Field(0, description="Replicas kept however idle. 0 allows scale to zero.", ge=0, le=1000)
    max_replicas: StrictInt | None = Field(
        None,
        description="Upper bound for the autoscaler, at least minReplicas. "
        "Default: 1 when minReplicas is 0, else minReplicas.",
        ge=1,
    )
    scale_up_window: str = duration_field(
        "30s", "Go duration. Scale up only to a level the load asked for through this whole window."
    )
    scale_down_window: str = duration_field(
        "10m", "Go duration. Scale down only to the highest level the load asked for within this window."
    )
    scale_to_zero_window: str = duration_field(
        "1h",
        "Go duration, at least 5m. With minReplicas 0: go to zero replicas after no request for this long. "
        "Ignored when minReplicas > 0.",
        minimum=MIN_SCALE_TO_ZERO_WINDOW,
    )
    idle_delete_after: str | None = duration_field(
        None,
        "Go duration. With minReplicas 0: delete this Deployment after no request for this long (an Event "
        "first). Default: the operator's setting, 168h (7 days). The annotation serving.loraserve.dev/keep: "
        '"true" opts out.',
        minimum="1m",
    )
    target_load_per_replica: StrictInt = Field(
        8, description="Concurrent requests (running + waiting) one replica should carry.", ge=1, le=10000
    )
    accelerator_type: AcceleratorType = Field(AcceleratorType.NVIDIA_A100_80GB, description="GPU type per replica.")
    accelerator_count: Literal[1, 2, 4, 8] | None = Field(
        None, description="GPUs per replica = tensor-parallel size. Default 1, or 2 with longPrompt."
    )
    long_prompt: StrictBool = Field(False, description="Long-context serving: doubles GPUs per replica when unset.")
    region: str | None = Field(
        None,
        description="Node region (topology.kubernetes.io/region). Fixed at creation.",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="More vLLM server flags, passed through as given. Flags the operator sets are refused.",
        max_length=64,
        json_schema_extra={
            "items": {"type": "string", "maxLength": 1024},
            "x-kubernetes-validations": [
                cel(
                    "self.all(a, "
                    + " && ".join(f"!(a == '{f}' || a.startsWith('{f}='))" for f in RESERVED_VLLM_FLAGS)
                    + ")",
                    "extraArgs must not set flags the operator owns: " + ", ".join(RESERVED_VLLM_FLAGS),
                )
            ],
        },
    )
    resources: Resources | None = Field(None, description="CPU, memory and disk for the model server.")
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Extra tolerations for the replicas (the GPU resource taint is tolerated already).",
        max_length=32,
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Extra environment for the model server (value, or valueFrom.secretKeyRef).",
        max_length=64,
    )
    credentials_secret: str | None = Field(
        None,
        description="Secret (same namespace) holding credentials for the model source: HF_TOKEN, or "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Never copied into the CR or logs.",
        pattern=DNS1123_PATTERN,
        max_length=253,
    )

    @field_validator("scale_up_window", "scale_down_window", "scale_to_zero_window", "idle_delete_after")
    @classmethod
    def _go_duration(cls, value: str | None) -> str | None:
        return None if value is None else check_duration(value)

    @model_validator(mode="after")
    def _cross_field(self) -> DeploymentSpec:
        check_rules(self, DEPLOYMENT_RULES)
        if parse_duration(self.scale_to_zero_window) < 5 * MINUTE:
            raise ValueError(f"scaleToZeroWindow: must be at least {MIN_SCALE_TO_ZERO_WINDOW}")
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in RESERVED_VLLM_FLAGS:
                raise ValueError(f"extraArgs: {arg.split('=', 1)[0]} is set by the operator")
        return self

    @property
    def effective_max_replicas(self) -> int:
        if self.max_replicas is not None:
            return self.max_replicas
        return 1 if self.min_replicas == 0 else self.min_replicas

    @property
    def effective_accelerator_count(self) -> int:
        if self.accelerator_count is not None:
            return self.accelerator_count
        return 2 if self.long_prompt else 1

    @property
    def effective_max_loras(self) -> int:
        return self.max_loras if self.max_loras is not None else 4

    @property
    def live_merge(self) -> bool:
        return self.model_version is not None

    def window_seconds(self) -> tuple[float, float, float]:
        """(scale-up, scale-down, scale-to-zero) windows in seconds."""
        return tuple(  # type: ignore[return-value]
            parse_duration(w) / SECOND
            for w in (self.scale_up_window, self.scale_down_window, self.scale_to_zero_window)
        )


class DeploymentStatus(ApiModel):
    observed_generation: int | None = Field(None, description="The spec generation this status describes.")
    state: DeploymentState | None = Field(
        None, description="CREATING, READY, UPDATING, SCALED_TO_ZERO, FAILED or DELETING."
    )
    message: str | None = Field(None, description="Why the deployment is in this state.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Reconciling and Stalled (kstatus).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    replicas: int | None = Field(None, description="Replicas that exist (scale subresource).")
    ready_replicas: int | None = Field(None, description="Replicas ready to serve.")
    desired_replicas: int | None = Field(None, description="Replicas the operator asks for.")
    selector: str | None = Field(None, description="Label selector of the replicas (scale subresource).")
    endpoint: str | None = Field(None, description="In-cluster URL of the replicas' Service.")
    accelerator: str | None = Field(
        None, description="Accelerator type and count per replica, e.g. NVIDIA_A100_80GB x2."
    )
    last_request_time: datetime | None = Field(
        None,
        description="Last request seen by the router (the idle clocks): while requests keep coming it is written "
        "about once a minute, and to the second once they stop.",
    )
    last_scale_time: datetime | None = Field(None, description="When replicas last changed.")
    scale_reason: str | None = Field(None, description="Why replicas last changed.")
    gpu_seconds: float | None = Field(None, description="Ready replicas x accelerators x seconds, accumulated.")


class Deployment(ApiModel):
    """A pool of GPU replicas running vLLM for one base model (multi-LoRA) or one merged fine-tune."""

    api_version: Literal["serving.loraserve.dev/v1alpha1"] = API_VERSION
    kind: Literal["Deployment"] = "Deployment"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: DeploymentSpec
    status: DeploymentStatus | None = None
