"""The autoscaler's reading of the routers' metrics: summed over router replicas and addons."""

from __future__ import annotations

import asyncio

import aiohttp

from loraserve.autoscale.signals import parse_router_addon_metrics, parse_router_metrics
from loraserve.handlers.autoscaler import _replica_load

ROUTER_A = """# TYPE loraserve_router_requests_in_flight gauge
loraserve_router_requests_in_flight{namespace="ns",deployment="pool",addon=""} 2.0
loraserve_router_requests_in_flight{namespace="ns",deployment="pool",addon="bot"} 3.0
# TYPE loraserve_router_requests_total counter
loraserve_router_requests_total{namespace="ns",deployment="pool",addon="bot",code="200"} 10.0
loraserve_router_requests_total{namespace="ns",deployment="pool",addon="bot",code="503"} 1.0
# TYPE loraserve_router_last_request_timestamp_seconds gauge
loraserve_router_last_request_timestamp_seconds{namespace="ns",deployment="pool",addon="bot"} 1700000000.0
"""
ROUTER_B = """# TYPE loraserve_router_requests_in_flight gauge
loraserve_router_requests_in_flight{namespace="ns",deployment="pool",addon="bot"} 1.0
# TYPE loraserve_router_requests_held gauge
loraserve_router_requests_held{namespace="ns",deployment="pool",addon="bot"} 1.0
# TYPE loraserve_router_last_request_timestamp_seconds gauge
loraserve_router_last_request_timestamp_seconds{namespace="ns",deployment="pool",addon="bot"} 1700000050.0
loraserve_router_last_request_timestamp_seconds{namespace="other",deployment="pool",addon=""} 1700000099.0
"""


def test_per_deployment_sums_replicas_and_addons() -> None:
    signals = parse_router_metrics([ROUTER_A, ROUTER_B])
    pool = signals[("ns", "pool")]
    assert pool.in_flight == 6
    assert pool.held == 1
    assert pool.requests_total == 11
    assert pool.last_request == 1700000050.0  # the newest over all router replicas
    assert signals[("other", "pool")].in_flight == 0


def test_per_addon() -> None:
    signals = parse_router_addon_metrics([ROUTER_A, ROUTER_B])
    assert signals[("ns", "pool", "bot")].in_flight == 4
    assert signals[("ns", "pool", "")].in_flight == 2
    assert signals[("ns", "pool", "bot")].last_request == 1700000050.0


def test_no_router_no_signal() -> None:
    assert parse_router_metrics([]) == {}


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
