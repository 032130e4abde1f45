"""Stopping a container of the local runtime ends its whole process group, as a kubelet's container runtime does:
a child that outlives its parent (vLLM's engine core) must not be left running once the pod is gone."""

from __future__ import annotations

import subprocess
import time

from loraserve.local.runtime import ContainerState, PodRunner, _group_running

# The parent dies at SIGTERM; its child ignores SIGTERM and lives on for `linger` seconds.
PROGRAM = "(trap '' TERM; sleep {linger}) & sleep 60"


def _start(linger: float) -> ContainerState:
    proc = subprocess.Popen(["bash", "-c", PROGRAM.format(linger=linger)], start_new_session=True)
    time.sleep(0.3)  # the child is running
    return ContainerState(name="c", image="i", process=proc)


def test_stop_waits_for_the_whole_group_within_the_grace_period() -> None:
    state = _start(linger=1.0)
    assert state.process is not None
    PodRunner._kill(state, grace=10.0)
    assert not _group_running(state.process.pid)


def test_what_outlives_the_grace_period_is_killed() -> None:
    state = _start(linger=60.0)
    assert state.process is not None
    PodRunner._kill(state, grace=0.5)
    assert not _group_running(state.process.pid)  # killed at the end of the grace period, not waited for
