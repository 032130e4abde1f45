"""What the CLI shows about live objects, and when `--wait` is over. Pure: no Kubernetes I/O.

`--wait` follows kstatus, as Flux and Argo CD do: an object is done when its `Ready` condition is True for its
current generation (`status.observedGeneration` equals `metadata.generation`), which for a Deployment is READY,
or SCALED_TO_ZERO when minReplicas is 0 and nothing asked for it yet; it has failed when `Stalled` is True for
its current generation (state FAILED: GPUStockout, BaseModelMismatch, AdapterLoadFailed, ...). A state that says
the object is still moving (CREATING, UPDATING, LOADING) is never done, whatever `Ready` says.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loraserve.api.naming import addon_deployment, base_model_name

Obj = Mapping[str, Any]


# States that say the object is still on its way, whatever the conditions say: status is written in partial
# patches, and a state and the conditions of two reconciles can meet for a moment.
MOVING = frozenset({"CREATING", "UPDATING", "LOADING", "DELETING", "FAILED"})


class Outcome(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"


def _status(obj: Obj) -> Mapping[str, Any]:
    return obj.get("status") or {}


def condition(obj: Obj, type_: str) -> Mapping[str, Any]:
    return next((c for c in _status(obj).get("conditions") or [] if c.get("type") == type_), {})


@dataclass(frozen=True)
class Observation:
    """One look at an object while waiting: the parts a person follows."""

    name: str
    exists: bool
    state: str | None = None
    ready: int | None = None
    desired: int | None = None
    reason: str = ""  # the Stalled reason (GPUStockout, ...) when stalled, else the Ready reason
    message: str = ""
    current: bool = False  # the status describes the current generation
    done: bool = False
    failed: bool = False

    def line(self) -> str:
        if not self.exists:
            return f"{self.name}: gone"
        parts = [f"{self.name}: {self.state or 'PENDING'}"]
        if self.desired is not None:
            parts.append(f"{self.ready or 0}/{self.desired} ready")
        if self.failed and self.reason:
            shown = self.message if self.message.startswith(self.reason) else f"{self.reason}: {self.message}"
            parts.append(shown if self.message else self.reason)
        return " · ".join(parts)


def observe(name: str, obj: Obj | None) -> Observation:
    """An Observation of a Deployment, LoraAddon or ModelVersion (None: it does not exist)."""
    if obj is None:
        return Observation(name, exists=False)
    status = _status(obj)
    generation = (obj.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    current = observed is not None and (generation is None or observed >= generation)
    ready_cond, stalled = condition(obj, "Ready"), condition(obj, "Stalled")
    is_stalled = current and stalled.get("status") == "True"
    shown = stalled if is_stalled else ready_cond
    if obj.get("kind") == "LoraAddon":
        ready, desired = status.get("loadedReplicas"), status.get("totalReplicas")
    elif obj.get("kind") == "Deployment":
        ready, desired = status.get("readyReplicas"), status.get("desiredReplicas")
    else:
        ready = desired = None
    return Observation(
        name=name,
        exists=True,
        state=status.get("state"),
        ready=ready,
        desired=desired,
        reason=str(shown.get("reason") or ""),
        message=str(shown.get("message") or status.get("message") or ""),
        current=current,
        done=current and ready_cond.get("status") == "True" and not is_stalled and status.get("state") not in MOVING,
        failed=is_stalled,
    )


def follow(
    name: str,
    stream: Iterable[Obj | None],
    on_change: Callable[[Observation], None],
    *,
    until_gone: bool = False,
) -> tuple[Outcome, Observation | None]:
    """Watch `stream` (each item the object as now seen, None once deleted; the stream ends at the deadline)
    until the object is done (or gone, with `until_gone`) or failed. Calls `on_change` for each new look."""
    last: Observation | None = None
    for obj in stream:
        seen = observe(name, obj)
        if seen != last:
            on_change(seen)
            last = seen
        if until_gone:
            if not seen.exists:
                return Outcome.DONE, seen
        elif seen.done:
            return Outcome.DONE, seen
        elif seen.failed:
            return Outcome.FAILED, seen
    return Outcome.TIMEOUT, last


# -- names clients call ------------------------------------------------------------------------------------
def deployment_model(obj: Obj) -> str:
    """The `model` clients send for a Deployment's base (or its merged fine-tune, by its own name)."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    spec = obj.get("spec") or {}
    if spec.get("baseModel"):
        return f"{base_model_name(str(spec['baseModel']))}#{name}"
    return name


def addon_model(obj: Obj) -> str | None:
    """`<addon>#<deployment>`; None while a serverless addon has no pool yet."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    deployment = addon_deployment(obj)
    return f"{name}#{deployment}" if deployment else None


# -- tables ------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _name(obj: Obj) -> str:
    return _text((obj.get("metadata") or {}).get("name"))


def deployment_row(obj: Obj) -> list[str]:
    spec, status = obj.get("spec") or {}, _status(obj)
    ready = f"{status.get('readyReplicas') or 0}/{status.get('desiredReplicas') or 0}" if status else ""
    return [
        _name(obj),
        _text(status.get("state")),
        ready,
        _text(status.get("accelerator") or spec.get("acceleratorType")),
        _text(spec.get("region")),
        deployment_model(obj),
    ]


def addon_row(obj: Obj) -> list[str]:
    status = _status(obj)
    targets = ",".join(
        f"{t.get('modelVersion')}:{t.get('weight')}" for t in (obj.get("spec") or {}).get("targets") or []
    )
    loaded = f"{status.get('loadedReplicas') or 0}/{status.get('totalReplicas') or 0}" if status else ""
    return [
        _name(obj),
        _text(addon_deployment(obj) or "(serverless)"),
        targets,
        _text(status.get("state")),
        loaded,
        _text(addon_model(obj)),
    ]


def model_version_row(obj: Obj) -> list[str]:
    spec, status = obj.get("spec") or {}, _status(obj)
    return [
        _name(obj),
        _text(spec.get("version")),
        _text((spec.get("baseModel") or {}).get("name")),
        _text((spec.get("adapter") or {}).get("uri")),
        _text(status.get("state")),
    ]


COLUMNS: dict[str, tuple[list[str], Callable[[Obj], list[str]]]] = {
    "Deployment": (["NAME", "STATE", "READY", "ACCELERATOR", "REGION", "MODEL"], deployment_row),
    "LoraAddon": (["NAME", "DEPLOYMENT", "TARGETS", "STATE", "LOADED", "MODEL"], addon_row),
    "ModelVersion": (["NAME", "VERSION", "BASE", "ADAPTER", "STATE"], model_version_row),
}


def clean(obj: Obj) -> dict[str, Any]:
    """An object as printed with -o yaml/json: without the server's bookkeeping (managedFields)."""
    out = dict(obj)
    metadata = dict(out.get("metadata") or {})
    metadata.pop("managedFields", None)
    if metadata:
        out["metadata"] = metadata
    return out
