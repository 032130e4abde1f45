"""The kstatus rules Flux uses (sigs.k8s.io/cli-utils/pkg/kstatus/status), for the objects we write."""

from __future__ import annotations

from typing import Any


def kstatus(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    if status.get("observedGeneration") != meta.get("generation"):
        return "InProgress"
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    if not conditions:
        return "Current"
    if conditions.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if conditions.get("Stalled", {}).get("status") == "True":
        return "Failed"
    if "Ready" in conditions:
        return "Current" if conditions["Ready"]["status"] == "True" else "InProgress"
    return "Current"
