"""Pieces shared by the three CRD models: camelCase aliases, the schema hooks, status conditions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from loraserve.durations import NON_NEGATIVE_DURATION_PATTERN, DurationError, parse_window

GROUP = "serving.loraserve.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "serving.loraserve.dev/v1alpha1"
CATEGORY = "loraserve"

# A DNS-1035 label: what a Service name must be. Deployment names become Service and pod names.
DNS1035_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MODEL_URI_PATTERN = r"^(hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+|(s3|gs)://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/\S*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?|https://\S+|file:///\S+)$"
MODEL_URI_DESCRIPTION = (
    "Where the weights are: hf://org/name, s3://bucket/prefix, gs://bucket/prefix, pvc://claim/path, "
    "https://host/path, or file:///path (a directory already on the node)."
)


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> JsonDict:
    """One `x-kubernetes-validations` entry."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


@dataclass(frozen=True)
class CrossFieldRule:
    """One cross-field rule, written once: the CEL admission runs, the same rule for Python (so the SDK, the
    CLI and the operator refuse what admission would), and one message naming one field for both. A rule
    with no Python form is a transition rule (it needs oldSelf): admission only."""

    rule: str
    message: str
    field: str  # as CEL's fieldPath: ".maxReplicas"
    holds: Callable[[Any], bool] | None

    def check(self, model: Any) -> None:
        if self.holds is not None and not self.holds(model):
            raise ValueError(f"{self.field.lstrip('.')}: {self.message}")


def validations(rules: Sequence[CrossFieldRule]) -> JsonDict:
    """The `x-kubernetes-validations` of a model, from its rules."""
    return {"x-kubernetes-validations": [cel(r.rule, r.message, r.field) for r in rules]}


def check_rules(model: Any, rules: Sequence[CrossFieldRule]) -> None:
    for rule in rules:
        rule.check(model)


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields refused, like a structural schema."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def duration_field(default: str | None, description: str, minimum: str = "0s") -> Any:
    """A Go duration string: the pattern for admission, plus a CEL rule on the field itself, because CEL's
    duration() is Go's own parser and refuses what no pattern can see (overflow)."""
    rule = cel(f"duration(self) >= duration('{minimum}')", f"must be a Go duration of at least {minimum}")
    return Field(
        default,
        description=description,
        pattern=NON_NEGATIVE_DURATION_PATTERN,
        max_length=32,
        json_schema_extra={"x-kubernetes-validations": [rule]},
    )


def check_duration(value: str) -> str:
    """Field validator body: refuse exactly what admission refuses."""
    try:
        parse_window(value)
    except DurationError as exc:
        raise ValueError(str(exc)) from None
    return value


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(description="Ready, Reconciling or Stalled (kstatus); others may be added.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason, e.g. GPUStockout.", max_length=1024)
    message: str = Field("", description="What a person needs to know.", max_length=32768)
    last_transition_time: datetime | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="The generation this condition describes.", ge=0)


class SecretKeyRef(ApiModel):
    name: str = Field(description="Secret name in the same namespace.", pattern=DNS1123_PATTERN, max_length=253)
    key: str = Field(description="Key in the Secret.", max_length=253)


class EnvVarSource(ApiModel):
    secret_key_ref: SecretKeyRef = Field(description="A Secret key: the value never appears in the CR.")


class EnvVar(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("has(self.value) != has(self.valueFrom)", "set exactly one of value or valueFrom")
            ]
        }
    )  # no fieldPath (the error names the env entry), so not a CrossFieldRule

    name: str = Field(description="Variable name.", pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)
    value: str | None = Field(None, description="Literal value (not for secrets: use valueFrom).")
    value_from: EnvVarSource | None = Field(None, description="Value from a Secret key.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if (self.value is None) == (self.value_from is None):
            raise ValueError(f"env {self.name}: set exactly one of value or valueFrom")
        return self
