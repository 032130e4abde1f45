"""Typed models of the three CRDs (group serving.loraserve.dev, version v1alpha1)."""

from loraserve.api.addon import AddonState, AddonTarget, AutoRollback, LoraAddon, LoraAddonSpec, LoraAddonStatus
from loraserve.api.common import API_VERSION, CATEGORY, GROUP, VERSION, Condition, ConditionStatus, EnvVar
from loraserve.api.deployment import (
    AcceleratorType,
    Deployment,
    DeploymentSpec,
    DeploymentState,
    DeploymentStatus,
)
from loraserve.api.modelversion import ModelVersion, ModelVersionSpec, ModelVersionStatus, VersionState

__all__ = [
    "API_VERSION",
    "CATEGORY",
    "GROUP",
    "VERSION",
    "AcceleratorType",
    "AddonState",
    "AddonTarget",
    "AutoRollback",
    "Condition",
    "ConditionStatus",
    "Deployment",
    "DeploymentSpec",
    "DeploymentState",
    "DeploymentStatus",
    "EnvVar",
    "LoraAddon",
    "LoraAddonSpec",
    "LoraAddonStatus",
    "ModelVersion",
    "ModelVersionSpec",
    "ModelVersionStatus",
    "VersionState",
]
