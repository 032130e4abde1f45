"""The autoscaler's reading of the routers' GET /load: summed over router replicas, addons and versions."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from pydantic import ValidationError

from loraserve.autoscale.signals import RouterLoad, addon_signals, deployment_signals
from loraserve.handlers.autoscaler import _replica_load
from loraserve.router.metrics import RouterMetrics


def router_loads() -> list[RouterLoad]:
    """What two router replicas answer at GET /load, written by the router's own metrics."""
    a, b = RouterMetrics(), RouterMetrics()
    a.series("ns", "pool", None).in_flight = 2
    bot_v1, bot_v2 = a.series("ns", "pool", "bot", "v1"), a.series("ns", "pool", "bot", "v2")
    bot_v1.in_flight, bot_v2.in_flight = 1, 2
    for code in (200,) * 10:
        bot_v1.finished(code)
    bot_v2.finished(503)
    bot_v1.last_request = 1700000000.0
    b.series("ns", "pool", "bot", "v1").in_flight = 1
    b.series("ns", "pool", "bot", "v1").held = 1
    b.series("ns", "pool", "bot", "v2").last_request = 1700000050.0
    b.series("other", "pool", None).last_request = 1700000099.0
    return [RouterLoad.model_validate_json(m.load()) for m in (a, b)]


def test_per_deployment_sums_replicas_addons_and_versions() -> None:
    signals = deployment_signals(router_loads())
    pool = signals[("ns", "pool")]
    assert pool.in_flight == 6
    assert pool.held == 1
    assert pool.requests_total == 11
    assert pool.last_request == 1700000050.0  # the newest over all router replicas
    assert signals[("other", "pool")].in_flight == 0
    assert signals[("other", "pool")].last_request == 1700000099.0


def test_per_addon() -> None:
    signals = addon_signals(router_loads())
    assert signals[("ns", "pool", "bot")].in_flight == 4
    assert signals[("ns", "pool", "")].in_flight == 2
    assert signals[("ns", "pool", "")].last_request is None  # never a request: no time, not 1970
    assert signals[("ns", "pool", "bot")].last_request == 1700000050.0


def test_no_router_no_signal() -> None:
    assert deployment_signals([]) == {}


@pytest.mark.parametrize(
    "body",
    [
        b"# TYPE loraserve_router_requests_in_flight gauge\n",  # a router's /metrics, not its /load
        b'{"format": 2, "buckets": {"ttft": [], "latency": []}, "addons": [], "versions": []}',
        b'{"format": 1, "buckets": {"ttft": [], "latency": []}, "addons": [["ns", "d"]], "versions": []}',
    ],
)
def test_what_is_not_a_routers_load_is_refused(body: bytes) -> None:
    with pytest.raises(ValidationError):
        RouterLoad.model_validate_json(body)


def test_a_replica_that_does_not_answer_is_not_a_load_of_zero() -> None:
    """A busy CPU replica can miss the metrics timeout (read as 0, that reset the up-window under load), or its
    readiness probe (then no replica is ready, which says no more about the load)."""

    async def scenario() -> tuple[float | None, float | None]:
        async with aiohttp.ClientSession() as session:
            # 192.0.2.0/24 is never routed (RFC 5737): refused, unreachable or timed out, never an answer
            return await _replica_load(session, []), await _replica_load(session, ["192.0.2.1"])

    no_replicas, silent = asyncio.run(scenario())
    assert no_replicas is None
    assert silent is None
