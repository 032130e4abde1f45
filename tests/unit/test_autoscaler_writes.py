"""What one Deployment's autoscaler writes to status while requests keep coming (its looks driven directly,
under a fake clock, with the routers' and the replicas' answers given): the last request time moves every
second, and is written about once a minute, then exactly once the traffic stops."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from loraserve.autoscale.signals import RouterSignal
from loraserve.handlers import autoscaler

START = 1_800_000_000.0


class Scene:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = START
        self.signal = RouterSignal()
        self.writes: list[tuple[float, dict[str, Any]]] = []
        monkeypatch.setattr(autoscaler, "time", SimpleNamespace(time=lambda: self.now))
        monkeypatch.setattr(
            autoscaler, "_patch_status", lambda _ns, _name, status: self.writes.append((self.now, status))
        )
        monkeypatch.setattr(autoscaler, "_session", lambda: None)
        monkeypatch.setattr(autoscaler, "routers_answered", lambda: True)

        async def router_signals(*_: Any) -> dict[tuple[str, str], RouterSignal]:
            return {("ns", "d"): self.signal}

        async def observed_pods(*_: Any) -> list[dict[str, Any]]:
            ready = {"conditions": [{"type": "Ready", "status": "True"}], "podIP": "10.0.0.1"}
            return [{"metadata": {"name": "d-0"}, "status": ready}]

        async def replica_load(*_: Any) -> float:
            return self.signal.in_flight

        monkeypatch.setattr(autoscaler, "router_signals", router_signals)
        monkeypatch.setattr(autoscaler, "observed_pods", observed_pods)
        monkeypatch.setattr(autoscaler, "_replica_load", replica_load)
        spec = {"baseModel": "hf://org/m", "enableAddons": True, "minReplicas": 1, "maxReplicas": 1, "replicas": 1}
        metadata = {"name": "d", "namespace": "ns", "creationTimestamp": "2027-01-15T08:00:00Z"}
        body = kopf.Body({"metadata": metadata, "spec": spec, "status": {"desiredReplicas": 1}})
        self.scaled = autoscaler.Scaled(body, "d", "ns", logging.getLogger(__name__))

    def written_request_times(self) -> list[str]:
        return [status["lastRequestTime"] for _, status in self.writes if "lastRequestTime" in status]


async def test_under_traffic_the_last_request_time_is_written_once_a_minute_and_when_it_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scene = Scene(monkeypatch)
    for _ in range(180):  # three minutes of a request every second, one in flight at each look
        scene.now += 1
        scene.signal.in_flight = 1
        scene.signal.requests_total += 1
        scene.signal.last_request = scene.now - 0.5
        await scene.scaled.look(False)
    assert 3 <= len(scene.written_request_times()) <= 4  # not 180

    last = scene.signal.last_request
    scene.now += 1
    scene.signal.in_flight = 0  # the traffic stops: nothing in flight, no new request
    await scene.scaled.look(False)
    assert scene.written_request_times()[-1] == autoscaler._iso(math.ceil(last))  # the exact second, at once
    writes = len(scene.writes)
    scene.now += 1
    await scene.scaled.look(False)
    assert len(scene.writes) == writes  # idle: nothing more to write
