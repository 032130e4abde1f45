"""What the handlers observe of load and readiness: ready replicas of a Deployment, and the routers'
metrics (scraped once per tick for every handler)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loraserve import rollback
from loraserve.autoscale.signals import RouterSignal, parse_router_addon_metrics, parse_router_metrics
from loraserve.handlers.deployment import kube
from loraserve.settings import AutoscalerSettings


def ready_replicas(pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and status.get("podIP") and not pod["metadata"].get("deletionTimestamp"):
            out.append((pod["metadata"]["name"], status["podIP"]))
    return out


@dataclass
class _RouterCache:
    """One scrape of the routers per tick, shared by every daemon."""

    at: float = 0.0
    texts: list[str] = field(default_factory=list)
    signals: dict[tuple[str, str], RouterSignal] = field(default_factory=dict)
    versions: dict[rollback.SeriesKey, rollback.Counters] | None = None  # parsed on first ask per scrape
    addons: dict[tuple[str, str, str], RouterSignal] | None = None  # parsed on first ask per scrape
    answered: bool = True  # some router answered the last scrape (or none is configured)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_cache = _RouterCache()


async def _router_urls(settings: AutoscalerSettings) -> list[str]:
    if settings.router_metrics_urls:
        return list(settings.router_metrics_urls)
    if settings.router_service is None:
        return []
    service, _, port = settings.router_service.partition(":")  # "name.namespace[:port]" (port: the router's)
    name, _, namespace = service.partition(".")
    pods = await asyncio.to_thread(
        kube().list_pods,
        namespace,
        {"app.kubernetes.io/name": "loraserve-router", "app.kubernetes.io/instance": name.removesuffix("-router")},
    )
    return [f"http://{ip}:{port or 8080}/metrics" for _, ip in ready_replicas(pods)]


async def router_signals(
    session: aiohttp.ClientSession, settings: AutoscalerSettings
) -> dict[tuple[str, str], RouterSignal]:
    await _scrape(session, settings)
    return _cache.signals


def routers_answered() -> bool:
    """Whether a router answered the last scrape (or none is configured): only then is an in-flight count of
    zero "no traffic" rather than "not known"."""
    return _cache.answered


def latest_signals() -> dict[tuple[str, str], RouterSignal]:
    """Per (namespace, deployment), from the last scrape."""
    return _cache.signals


def latest_addon_signals() -> dict[tuple[str, str, str], RouterSignal]:
    """Per (namespace, deployment, addon), from the last scrape."""
    if _cache.addons is None:
        _cache.addons = parse_router_addon_metrics(_cache.texts)
    return _cache.addons


def latest_version_counters() -> dict[rollback.SeriesKey, rollback.Counters]:
    """Per (namespace, deployment, addon, version), from the last scrape: the routers' cumulative request,
    error and latency counters (the automatic rollback's input), parsed once per scrape for every addon."""
    if _cache.versions is None:
        _cache.versions = rollback.parse_counters(_cache.texts)
    return _cache.versions


async def _scrape(session: aiohttp.ClientSession, settings: AutoscalerSettings) -> None:
    async with _cache.lock:
        if time.monotonic() - _cache.at < settings.tick / 2:
            return
        texts = []
        urls = await _router_urls(settings)
        for url in urls:
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        texts.append(await resp.text())
            except (aiohttp.ClientError, TimeoutError):
                pass  # a router replica that does not answer contributes nothing this tick
        # In-flight counts add up over the routers: those that answered give a lower bound, which is known load.
        _cache.answered = bool(texts) or not urls
        _cache.texts = texts
        _cache.signals = parse_router_metrics(texts)
        _cache.versions = None
        _cache.addons = None
        _cache.at = time.monotonic()
    for listener in SCRAPE_LISTENERS:
        listener()


async def scrape_routers(settings: AutoscalerSettings) -> None:
    """Scrape the routers once per tick, for as long as the operator runs: the listeners decide whom the
    traffic wakes, so an idle Deployment or addon is not looked at between its own deadlines."""
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                await _scrape(session, settings)
            except Exception as exc:  # one failed scrape (e.g. listing router pods) is not the end
                logging.getLogger(__name__).warning(f"scraping the routers failed: {exc!r}")
            await asyncio.sleep(settings.tick)


# Called after each scrape (e.g. the addons: a request held for an unloaded adapter wakes its addon).
SCRAPE_LISTENERS: list[Callable[[], None]] = []
