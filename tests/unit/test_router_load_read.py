"""The operator's read of the routers' GET /load (a real router's metrics port on localhost): the signals every
tick, and the per-version counters only while an addon has a rollback rule, and only when every router
answered, since a missing sample is not a sample of zeros."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from loraserve.handlers import load
from loraserve.local.cluster import free_port
from loraserve.router.app import RouterApp
from loraserve.router.gateway import Gateway, RouterConfig
from loraserve.router.hold import NullWaker
from loraserve.router.topology import TopologyStore
from loraserve.settings import AutoscalerSettings

BOT = ("ns", "d", "bot")


@pytest.fixture
async def router_url() -> AsyncIterator[str]:
    gateway = Gateway(TopologyStore(), NullWaker(), config=RouterConfig(serve_metrics=False))
    for code in (200, 200, 503):
        gateway.metrics.series("ns", "d", "bot", "v2").finished(code)
    gateway.metrics.series("ns", "d", "bot", "v1").in_flight = 2
    app = RouterApp(gateway=gateway, metrics_port=0)
    await app.start()
    try:
        yield f"http://127.0.0.1:{app.metrics_port}/load"
    finally:
        await app.stop()


async def scrape(monkeypatch: pytest.MonkeyPatch, urls: list[str], rule: bool) -> None:
    monkeypatch.setattr(load, "_cache", load._RouterCache())
    monkeypatch.setattr(load, "VERSIONS_WANTED", [lambda: rule])
    async with aiohttp.ClientSession() as session:
        await load._scrape(session, AutoscalerSettings(router_load_urls=tuple(urls)))


async def test_signals_every_tick_versions_only_for_a_rule(router_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await scrape(monkeypatch, [router_url], rule=False)
    signal = load.latest_signals()[("ns", "d")]
    assert (signal.in_flight, signal.requests_total) == (2, 3)
    assert load.latest_addon_signals()[BOT].in_flight == 2
    assert load.latest_version_counters(BOT) is None  # not asked for: not known, not zero

    await scrape(monkeypatch, [router_url], rule=True)
    counters = load.latest_version_counters(BOT)
    assert counters is not None
    assert (counters["v2"].requests, counters["v2"].errors) == (3, 1)
    assert load.latest_version_counters(("ns", "d", "other")) == {}


async def test_versions_not_known_while_a_router_does_not_answer(
    router_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = f"http://127.0.0.1:{free_port()}/load"  # nothing listens there
    await scrape(monkeypatch, [router_url, silent], rule=True)
    assert load.routers_answered()
    assert load.latest_signals()[("ns", "d")].requests_total == 3  # the load known is a lower bound: kept
    assert load.latest_version_counters(BOT) is None
