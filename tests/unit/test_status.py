"""Status decisions and what Flux's kstatus makes of them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from loraserve.api.deployment import DeploymentSpec
from loraserve.status import Observed, compute_status, since_written, status_patch
from tests.kstatus import kstatus

SPEC = DeploymentSpec.model_validate({"baseModel": "hf://org/model", "minReplicas": 1})
NOW = datetime(2026, 11, 24, tzinfo=UTC)


def child(replicas: int, ready: int, updated: int, observed: int = 1, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
        },
    }


def unschedulable(message: str) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
        },
    }


def cr(status: dict[str, Any], generation: int = 3) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": status}


def test_creating_then_ready() -> None:
    creating = compute_status(SPEC, 3, 1, Observed(child(1, 0, 1), []), {}, NOW)
    assert creating["state"] == "CREATING"
    assert kstatus(cr(creating)) == "InProgress"
    ready = compute_status(SPEC, 3, 1, Observed(child(1, 1, 1), []), creating, NOW)
    assert ready["state"] == "READY"
    assert kstatus(cr(ready)) == "Current"


def test_stale_observed_generation_is_in_progress() -> None:
    ready = compute_status(SPEC, 3, 1, Observed(child(1, 1, 1), []), {}, NOW)
    assert kstatus(cr(ready, generation=4)) == "InProgress"


def test_rollout_is_updating() -> None:
    ready = compute_status(SPEC, 3, 1, Observed(child(1, 1, 1), []), {}, NOW)
    rolling = compute_status(SPEC, 4, 1, Observed(child(2, 1, 1, observed=2, generation=2), []), ready, NOW)
    assert rolling["state"] == "UPDATING"
    assert kstatus(cr(rolling, generation=4)) == "InProgress"


def test_gpu_stockout_is_stalled_with_the_scheduler_message() -> None:
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    status = compute_status(SPEC, 3, 1, Observed(child(1, 0, 1), [unschedulable(message)]), {}, NOW)
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "GPUStockout")
    assert message in stalled["message"]
    assert status["state"] == "FAILED"
    assert kstatus(cr(status)) == "Failed"


@pytest.mark.parametrize(
    "message",
    [
        "0/2 nodes are available: 2 Insufficient memory.",
        "0/1 nodes are available: 1 node(s) had untolerated taint {loraserve.dev/trial: }.",
        "0/1 nodes are available: 1 pod has unbound immediate PersistentVolumeClaims.",
    ],
)
def test_unschedulable_for_other_reasons_is_stalled_but_not_a_stockout(message: str) -> None:
    status = compute_status(SPEC, 3, 1, Observed(child(1, 0, 1), [unschedulable(message)]), {}, NOW)
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "Unschedulable")
    assert message in stalled["message"]
    assert message in status["message"]
    assert kstatus(cr(status)) == "Failed"


def test_a_crash_looping_model_server_is_stalled() -> None:
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "vllm", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}}
            ],
        },
    }
    status = compute_status(SPEC, 3, 1, Observed(child(1, 0, 1), [pod]), {}, NOW)
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "ModelServerFailing")
    assert "CrashLoopBackOff" in stalled["message"]


def test_scaled_to_zero_is_healthy() -> None:
    spec = DeploymentSpec.model_validate({"baseModel": "hf://org/model"})
    status = compute_status(spec, 1, 0, Observed(child(0, 0, 0), []), {}, NOW)
    assert status["state"] == "SCALED_TO_ZERO"
    assert kstatus(cr(status, generation=1)) == "Current"


def test_transition_time_kept_while_status_unchanged() -> None:
    first = compute_status(SPEC, 3, 1, Observed(child(1, 1, 1), []), {}, NOW)
    later = compute_status(SPEC, 3, 1, Observed(child(1, 1, 1), []), first, datetime(2026, 11, 25, tzinfo=UTC))
    assert later["conditions"] == first["conditions"]


def test_status_is_written_whole_or_not_at_all() -> None:
    from loraserve.status import status_patch

    previous = {"state": "UPDATING", "readyReplicas": 0, "message": "0/1 replicas ready"}
    assert status_patch(previous, dict(previous)) == {}
    new = {"state": "READY", "readyReplicas": 1, "message": "0/1 replicas ready"}
    assert status_patch(previous, new) == new  # unchanged keys too: a stale previous cannot leave a mix


def test_a_status_written_is_not_written_again_before_the_watch_brings_it_back() -> None:
    """The body still shows the status before the last write (the watch lags under load): compared with what
    was written, an unchanged status is no write (and no second transition Event)."""
    spec = SPEC
    ready = compute_status(spec, 1, 1, Observed(child=child(1, 1, 1), pods=[]), {}, NOW)
    stale = {"status": {"state": "UPDATING", "observedGeneration": 1, "otherField": "kept"}}
    assert status_patch(stale["status"], ready)  # against the body alone: written again
    previous = since_written(stale, ready)
    assert previous["state"] == ready["state"]
    assert previous["otherField"] == "kept"  # what another writer put there stays visible
    assert status_patch(previous, ready) == {}
    assert since_written(stale, None) == stale["status"]  # nothing written yet (a new operator): the body
