"""Pure LoraAddon decisions: is the addon acceptable for its Deployment, and what must be loaded or
unloaded on each ready replica. No I/O: the handler observes, this decides, the handler executes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraserve.api.addon import LoraAddonSpec
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.api.naming import adapter_served_name


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


@dataclass(frozen=True)
class Artifact:
    served_name: str
    uri: str
    digest: str | None


@dataclass(frozen=True)
class Replica:
    name: str
    ip: str
    loaded: frozenset[str]


@dataclass
class ReplicaPlan:
    replica: Replica
    load: list[Artifact] = field(default_factory=list)
    unload: list[str] = field(default_factory=list)


def check(
    addon: str,
    spec: LoraAddonSpec,
    deployment_name: str,
    deployment: DeploymentSpec | None,
    versions: dict[str, ModelVersionSpec | None],
) -> Refusal | None:
    """Why this addon cannot be served on this Deployment, or None if it can."""
    if deployment is None:
        return Refusal("DeploymentNotFound", f"Deployment {deployment_name!r} not found")
    if not deployment.enable_addons:
        return Refusal("AddonsNotEnabled", f"Deployment {deployment_name!r} does not set enableAddons: true")
    for target in spec.targets:
        version = versions.get(target.model_version)
        if version is None:
            return Refusal("ModelVersionNotFound", f"ModelVersion {target.model_version!r} not found")
        if version.base_model.name != deployment.base_model:
            return Refusal(
                "BaseModelMismatch",
                f"ModelVersion {target.model_version!r} was trained on {version.base_model.name}, but Deployment "
                f"{deployment_name!r} serves {deployment.base_model}",
            )
        if version.adapter.rank is not None and version.adapter.rank > deployment.max_lora_rank:
            return Refusal(
                "AdapterRankTooHigh",
                f"ModelVersion {target.model_version!r} has rank {version.adapter.rank}, above the Deployment's "
                f"maxLoraRank {deployment.max_lora_rank}",
            )
    return None


def artifacts(addon: str, spec: LoraAddonSpec, versions: dict[str, ModelVersionSpec]) -> list[Artifact]:
    """Every target version of the addon, under its stable served name `<addon>-<version>`."""
    out = []
    for target in spec.targets:
        version = versions[target.model_version]
        out.append(Artifact(adapter_served_name(addon, version.version), version.adapter.uri, version.adapter.digest))
    return out


def owned_by(addon: str, served_name: str) -> bool:
    """Whether a loaded adapter name is one of this addon's versions (`<addon>-v<N>`, nothing looser)."""
    return re.fullmatch(re.escape(addon) + r"-v[1-9][0-9]*", served_name) is not None


def plan(addon: str, wanted: list[Artifact], keep_warm: set[str], replicas: list[Replica]) -> list[ReplicaPlan]:
    """Per ready replica: load what is wanted and missing (a restarted vLLM has forgotten everything, so it
    gets all again); unload this addon's other versions, except those kept warm after a rollback."""
    names = {a.served_name for a in wanted}
    plans = []
    for replica in replicas:
        step = ReplicaPlan(replica)
        step.load = [a for a in wanted if a.served_name not in replica.loaded]
        step.unload = sorted(n for n in replica.loaded if owned_by(addon, n) and n not in names and n not in keep_warm)
        plans.append(step)
    return plans


def weights_text(addon: str, spec: LoraAddonSpec, versions: dict[str, ModelVersionSpec | None]) -> str:
    parts = []
    for t in spec.targets:
        version = versions.get(t.model_version)
        parts.append(f"{version.version if version else t.model_version}:{t.weight}")
    return ",".join(parts)
