"""Pure status decisions: from the observed child Deployment and its pods to the CR's state and
kstatus conditions (Ready / Reconciling / Stalled), so Flux and Argo CD see true health."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loraserve.api.deployment import DeploymentSpec, DeploymentState

GPU_SHORT = re.compile(r"Insufficient (nvidia\.com/gpu|amd\.com/gpu)")
SELECTOR_MISMATCH = "didn't match Pod's node affinity/selector"


@dataclass(frozen=True)
class Observed:
    """What the handler read: the child apps/v1 Deployment (or None) and its pods (dicts)."""

    child: dict[str, Any] | None
    pods: list[dict[str, Any]]


def condition(type_: str, status: bool, reason: str, message: str, generation: int, now: str) -> dict[str, Any]:
    """Every condition the operator writes (Deployments and LoraAddons) is built here."""
    return {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": now,
    }


def kstatus_conditions(
    ready: bool, reconciling: bool, stalled: bool, reason: str, message: str, generation: int, now: str
) -> list[dict[str, Any]]:
    """The three conditions kstatus reads (Ready, Reconciling, Stalled), sharing one reason and message."""
    return [
        condition("Ready", ready, reason, message, generation, now),
        condition("Reconciling", reconciling, reason, message, generation, now),
        condition("Stalled", stalled, reason, message, generation, now),
    ]


Status = dict[str, Any]


def since_written(body: Mapping[str, Any], written: Mapping[str, Any] | None) -> Status:
    """The status to compare a new one with: the body's, under the fields this operator last wrote. Under load
    the watch brings a write back seconds later; comparing with the body alone repeated the write, and the
    transition's Event (up to four times per object at 1,000 Deployments)."""
    return {**dict(body.get("status") or {}), **(written or {})}


def caught_up(body: Mapping[str, Any], written: Mapping[str, Any] | None) -> bool:
    """The body shows every field this operator last wrote: its copy of them (for since_written) can go."""
    status = body.get("status") or {}
    return written is not None and all(status.get(k) == v for k, v in written.items())


def status_patch(previous: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """What to write: nothing when nothing changed, else the whole status, so that a stale `previous` (a timer
    and an event handler racing) can never leave a mix of old and new fields (UPDATING beside Ready=True)."""
    return dict(status) if any(previous.get(k) != v for k, v in status.items()) else {}


def merge_conditions(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change (API conventions)."""
    before = {c.get("type"): c for c in old}
    out = []
    for cond in new:
        prev = before.get(cond["type"])
        if prev is not None and prev.get("status") == cond["status"] and prev.get("lastTransitionTime"):
            cond = {**cond, "lastTransitionTime": prev["lastTransitionTime"]}
        out.append(cond)
    return out


def unschedulable(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, the scheduler's message) for a pod the scheduler cannot place, if any: GPUStockout when GPUs
    (or GPU nodes) are what is missing, else Unschedulable (a taint, a selector, CPU or memory, a volume)."""
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        if pod.get("status", {}).get("phase") != "Pending":
            continue
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                if cond.get("reason") != "Unschedulable":
                    continue  # e.g. SchedulingGated: waiting on purpose, not stuck
                message = str(cond.get("message") or "no node fits the pod")
                return ("GPUStockout" if _gpus_missing(message) else "Unschedulable"), message
    return None


def _gpus_missing(message: str) -> bool:
    """From the scheduler's "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) didn't match
    Pod's node affinity/selector." : GPUs are what is missing when a node lacks free GPUs, or when no node of
    the accelerator type (and region) exists at all; a taint, CPU, memory or a volume is another reason."""
    if GPU_SHORT.search(message) or message.startswith("no nodes available"):
        return True
    per_node = message.split("preemption:")[0].partition(": ")[2].rstrip(". ").split(", ")
    return bool(per_node) and all(SELECTOR_MISMATCH in part for part in per_node)


def gpu_stockout(pods: list[dict[str, Any]]) -> str | None:
    """The scheduler's message for a pod Unschedulable for lack of GPUs (or of GPU nodes), if any."""
    found = unschedulable(pods)
    return found[1] if found and found[0] == "GPUStockout" else None


def crash_looping(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        status = pod.get("status", {})
        # init steps first: a failed base fetch or merge (MergeFailed: ...) keeps vLLM from ever starting
        for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in (
                "CrashLoopBackOff",
                "ImagePullBackOff",
                "ErrImagePull",
                "CreateContainerConfigError",
            ):
                last = ((cs.get("lastState") or {}).get("terminated") or {}).get("message") or ""
                detail = f"{waiting.get('message', '')} {last.strip()}".strip()
                return f"container {cs.get('name')}: {waiting.get('reason')}: {detail}".strip()
    return None


def compute_status(
    spec: DeploymentSpec,
    generation: int,
    desired: int,
    observed: Observed,
    previous: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """The CR status (a patch for .status) for what was observed."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    child = observed.child or {}
    child_status = child.get("status") or {}
    child_gen = (child.get("metadata") or {}).get("generation")
    rolled = child_gen is not None and child_status.get("observedGeneration", -1) >= child_gen
    replicas = int(child_status.get("replicas") or 0)
    ready = int(child_status.get("readyReplicas") or 0)
    updated = int(child_status.get("updatedReplicas") or 0)
    was_ready = previous.get("state") not in (None, DeploymentState.CREATING.value)

    stuck = unschedulable(observed.pods)
    crash = crash_looping(observed.pods)
    complete = rolled and ready >= desired and updated >= desired and replicas == desired

    if stuck or crash:
        reason, detail = stuck if stuck else ("ModelServerFailing", crash or "")
        message = f"{reason}: {detail}"
        state = DeploymentState.FAILED if ready == 0 else DeploymentState.UPDATING
        conditions = [
            condition("Ready", ready >= desired and desired > 0, reason, message, generation, stamp),
            condition("Reconciling", False, reason, message, generation, stamp),
            condition("Stalled", True, reason, message, generation, stamp),
        ]
    elif complete and desired == 0:
        state = DeploymentState.SCALED_TO_ZERO
        message = "scaled to zero; the first request wakes it"
        conditions = [
            condition("Ready", True, "ScaledToZero", message, generation, stamp),
            condition("Reconciling", False, "ScaledToZero", message, generation, stamp),
            condition("Stalled", False, "ScaledToZero", message, generation, stamp),
        ]
    elif complete:
        state = DeploymentState.READY
        message = f"{ready}/{desired} replicas ready"
        conditions = [
            condition("Ready", True, "ReplicasReady", message, generation, stamp),
            condition("Reconciling", False, "ReplicasReady", message, generation, stamp),
            condition("Stalled", False, "ReplicasReady", message, generation, stamp),
        ]
    else:
        state = DeploymentState.UPDATING if was_ready else DeploymentState.CREATING
        reason = "RollingOut" if was_ready else "Creating"
        message = f"{ready}/{desired} replicas ready, {updated} updated"
        conditions = [
            condition("Ready", False, reason, message, generation, stamp),
            condition("Reconciling", True, reason, message, generation, stamp),
            condition("Stalled", False, reason, message, generation, stamp),
        ]
    count = spec.effective_accelerator_count
    return {
        "observedGeneration": generation,
        "state": state.value,
        "message": message,
        "conditions": merge_conditions(previous.get("conditions") or [], conditions),
        "replicas": replicas,
        "readyReplicas": ready,
        "desiredReplicas": desired,
        "accelerator": f"{spec.accelerator_type.value} x{count}",
    }
