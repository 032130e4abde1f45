"""Pure LoraAddon decisions: is the addon acceptable for its Deployment, and what must be loaded or
unloaded on each ready replica. No I/O: the handler observes, this decides, the handler executes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from loraserve.api.addon import LoraAddonSpec
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.api.naming import adapter_served_name, base_model_name


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


def out_of_step(name: str, status: Mapping[str, Any], loaded: list[frozenset[str] | None]) -> bool:
    """Whether the replicas' loaded adapters (one set per ready replica; None: it did not answer) differ from
    what the addon's status says: a served version missing on a replica, one of its versions loaded that it
    neither serves nor keeps warm, or another number of replicas. A Deployment's slow resync asks each replica
    once and wakes only the addons this is true of."""
    served = set(status.get("servedNames") or [])
    kept = served | set(status.get("retired") or {})
    if status.get("totalReplicas") != len(loaded):
        return True
    return any(
        names is None or not served <= names or any(owned_by(name, n) and n not in kept for n in names)
        for names in loaded
    )


def orphaned(deployment_name: str, loaded: Iterable[str], placed_on: Callable[[str], str | None]) -> list[str]:
    """Adapters loaded on a replica of `deployment_name` whose addon is gone, or is served on another
    Deployment (`placed_on(addon)`: None when no such addon exists, "" while a serverless addon is not seated
    yet, which keeps its adapters): what an unload lost to a killed operator leaves behind."""
    out = []
    for served_name in sorted(loaded):
        owner = re.fullmatch(r"(.+)-v[1-9][0-9]*", served_name)
        if owner is None:
            continue  # not a name the operator gives
        where = placed_on(owner.group(1))
        if where is None or (where and where != deployment_name):
            out.append(served_name)
    return out


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


def keep_warm(
    retired: Mapping[str, str],
    served: list[str],
    wanted: set[str],
    now: datetime,
    grace: timedelta,
    idle: bool,
) -> dict[str, str]:
    """Versions dropped from the targets stay loaded for `grace` (served name -> when it left), so a rollback
    by hand is a pointer flip: flipping back finds the version still loaded and serves it with no load step.
    A version wanted again leaves the list; an idle addon keeps nothing warm (it is unloaded as a whole)."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = {k: v for k, v in retired.items() if k not in wanted}
    for old in served:
        if old not in wanted and old not in out:
            out[old] = stamp
    if idle:
        return {}
    return {k: v for k, v in out.items() if now - datetime.fromisoformat(v.replace("Z", "+00:00")) < grace}


def weights_text(addon: str, spec: LoraAddonSpec, versions: dict[str, ModelVersionSpec | None]) -> str:
    parts = []
    for t in spec.targets:
        version = versions.get(t.model_version)
        parts.append(f"{version.version if version else t.model_version}:{t.weight}")
    return ",".join(parts)


# -- the serverless pool: one shared, operator-managed Deployment per base model and namespace ---------------
POOL_CAPACITY = 100


def pool_name(base_model: str) -> str:
    """A stable DNS-1035 name of at most 40 characters for the pool of a base model."""
    digest = hashlib.sha256(base_model.encode()).hexdigest()[:6]
    slug = re.sub(r"[^a-z0-9]+", "-", base_model_name(base_model).lower()).strip("-")[:21].rstrip("-")
    return f"serverless-{slug}-{digest}" if slug else f"serverless-{digest}"


def pool_base(spec: LoraAddonSpec, versions: dict[str, ModelVersionSpec | None]) -> str | Refusal:
    """The base model whose pool serves an addon without a deployment: the one all its versions share."""
    bases = {v.base_model.name for v in versions.values() if v is not None}
    missing = [t.model_version for t in spec.targets if versions.get(t.model_version) is None]
    if missing:
        return Refusal("ModelVersionNotFound", f"ModelVersion {missing[0]!r} not found")
    if len(bases) != 1:
        return Refusal(
            "BaseModelMismatch", f"the versions of a serverless addon must share one base model: {sorted(bases)}"
        )
    return bases.pop()


def pool_spec(base_model: str, overrides: dict[str, object]) -> dict[str, object]:
    """The pool's Deployment spec: multi-LoRA, scale to zero; the operator's settings may add to it."""
    return {
        "baseModel": base_model,
        "enableAddons": True,
        "maxLoras": 8,
        "maxLoraRank": 64,
        "minReplicas": 0,
        **overrides,
    }


def serverless_base(item: Mapping[str, Any], mv_bases: Mapping[str, str]) -> str | None:
    """The base model of a serverless LoraAddon object (all its versions share it), None when unknown."""
    targets = (item.get("spec") or {}).get("targets") or []
    bases = {mv_bases.get(str(t.get("modelVersion"))) for t in targets if isinstance(t, Mapping)}
    return bases.pop() if len(bases) == 1 else None


def pool_members(
    pool: str, base_model: str, items: Sequence[Mapping[str, Any]], mv_bases: Mapping[str, str]
) -> list[tuple[bool, str, str]]:
    """(seated, creationTimestamp, name) of every live serverless addon that belongs to this pool: seated in
    it (status.deployment), or not seated yet and of the same base model. Addons with a Deployment of their
    own, addons being deleted and addons of other base models take no seat."""
    members = []
    for item in items:
        meta = item.get("metadata") or {}
        if (item.get("spec") or {}).get("deployment") or meta.get("deletionTimestamp"):
            continue
        seated_in = (item.get("status") or {}).get("deployment")
        if seated_in:
            if seated_in != pool:
                continue
        elif serverless_base(item, mv_bases) != base_model:
            continue
        members.append((bool(seated_in), str(meta.get("creationTimestamp") or ""), str(meta.get("name"))))
    return members


def pool_seat(addon: str, members: list[tuple[bool, str, str]]) -> int:
    """This addon's seat: addons already seated keep theirs (a newcomer never evicts a loaded addon), then the
    others by (creationTimestamp, name): first come, first served."""
    ordered = sorted(members, key=lambda m: (not m[0], m[1], m[2]))
    return next(i for i, (_, _, name) in enumerate(ordered) if name == addon)


@dataclass(frozen=True)
class PoolVerdict:
    delete: bool
    reason: str


def pool_gc(
    members: int, in_flight: float, held: float, last_request: float | None, created: float, now: float, grace: float
) -> PoolVerdict:
    """Whether a serverless pool can go: no addon left in it and no traffic (nothing in flight or held, no
    request and no creation within `grace` seconds, so a pool created for an addon not seated yet stays)."""
    if members:
        return PoolVerdict(False, f"{members} addons seated")
    if in_flight > 0 or held > 0:
        return PoolVerdict(False, "requests in flight")
    recent = max(t for t in (last_request, created) if t is not None)
    if now - recent < grace:
        return PoolVerdict(False, f"used {now - recent:.0f}s ago (grace {grace:.0f}s)")
    return PoolVerdict(True, f"no addon left and no request for {now - recent:.0f}s")


def warm_until(retired: Mapping[str, str], grace: timedelta) -> list[datetime]:
    """When each version kept warm after leaving the targets is unloaded."""
    return [datetime.fromisoformat(left.replace("Z", "+00:00")) + grace for left in retired.values()]


def next_look(
    now: datetime,
    *,
    resync: float,
    idle_at: datetime | None = None,
    warm_until: list[datetime] | None = None,
    retry_at: list[datetime] | None = None,
    sample_every: float | None = None,
) -> float:
    """Seconds until the addon must be looked at again when nothing changes around it: the slow resync, the
    moment it turns idle, a warm version's grace ends, a failed load is retried, or the automatic rollback
    takes its next sample of the routers' counters. Events (its spec, its replicas, its ModelVersions, a
    request held for it) wake it sooner."""
    due = [resync]
    if sample_every is not None:
        due.append(sample_every)
    for moment in [idle_at, *(warm_until or []), *(retry_at or [])]:
        if moment is not None:
            due.append((moment - now).total_seconds())
    return max(0.0, min(due))


@dataclass(frozen=True)
class Idleness:
    idle: bool  # no request for idle_after and none in flight: unload everything
    last_request: float  # epoch seconds: the latest activity seen (now, while a request is in flight)
    woken: bool  # it was unloaded and is wanted again: a fresh idle period starts now
    idle_at: float | None  # when it turns idle if nothing more happens (None: it is idle)


def idleness(
    now: float,
    seen: list[float | None],
    idle_after: float,
    in_flight: float,
    previous_state: str | None,
) -> Idleness:
    """`seen`: what marks activity (the routers' last request, status.lastRequestTime, creation, loadedAt).
    A request in flight (a held one, for an unloaded adapter) is activity now."""
    last = max((t for t in seen if t is not None), default=now)
    if in_flight > 0:
        last = max(last, now)
    idle = now - last >= idle_after
    if idle:
        return Idleness(True, last, False, None)
    woken = previous_state == "UNLOADED"
    return Idleness(False, last, woken, (now if woken else last) + idle_after)


@dataclass(frozen=True)
class Verdict:
    state: str
    reason: str
    message: str
    ready: bool
    reconciling: bool
    stalled: bool


def verdict(failures: list[Refusal], idle: bool, idle_after: float, loaded: int, total: int) -> Verdict:
    """The addon's state from what this round did: failures first, then idle, then readiness."""
    if failures:
        message = "; ".join(f.message for f in failures[:3])
        return Verdict("FAILED" if loaded == 0 else "LOADING", failures[0].reason, message, False, False, True)
    if idle:
        message = f"no request for {idle_after:.0f}s: unloaded; the next request loads it again"
        return Verdict("UNLOADED", "IdleUnloaded", message, True, False, False)
    if total == 0:
        message = "no ready replica: adapters load on each replica as it becomes ready"
        return Verdict("PENDING", "NoReadyReplicas", message, True, False, False)
    message = f"loaded on {loaded}/{total} ready replicas"
    if loaded < total:
        return Verdict("LOADING", "Loading", message, False, True, False)
    return Verdict("READY", "AdaptersLoaded", message, True, False, False)


def capacity(served_versions: int, max_loras: int) -> tuple[bool, str, str]:
    """(over, reason, message) for the OverCapacity condition: more versions than maxLoras works (vLLM swaps
    them) but costs latency."""
    over = served_versions > max_loras
    reason = "AdaptersExceedMaxLoras" if over else "WithinMaxLoras"
    return over, reason, f"{served_versions} adapter versions for {max_loras} GPU slots (maxLoras)"
