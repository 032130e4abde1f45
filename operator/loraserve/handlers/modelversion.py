"""ModelVersion: validated once and marked READY. Its spec is immutable (CEL `self == oldSelf` at admission),
so there is nothing to roll out; the status gives GitOps tools a health to read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from loraserve.api.common import GROUP, VERSION
from loraserve.api.modelversion import ModelVersionSpec


@kopf.on.resume(GROUP, VERSION, "modelversions")
@kopf.on.create(GROUP, VERSION, "modelversions")
def modelversion_created(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    generation = int(body.metadata.get("generation") or 0)
    if dict(body.status).get("observedGeneration") == generation:
        return
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        spec = ModelVersionSpec.model_validate(dict(body.spec))
    except ValidationError as exc:
        state, ready, reason, message = "FAILED", False, "InvalidSpec", str(exc).replace("\n", " ")
    else:
        state, ready, reason = "READY", True, "Pinned"
        message = f"{spec.version} of {spec.adapter.uri} on {spec.base_model.name}@{spec.base_model.revision}"

    def cond(kind: str, value: bool) -> dict[str, Any]:
        return {
            "type": kind,
            "status": str(value),
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": now,
        }

    patch.status.update(
        observedGeneration=generation,
        state=state,
        message=message,
        conditions=[cond("Ready", ready), cond("Reconciling", False), cond("Stalled", not ready)],
    )
