"""What the handlers observe of load and readiness: ready replicas of a Deployment, and the routers' load
(GET /load of each router replica, read once per tick for every handler)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError

from loraserve import rollback
from loraserve.autoscale.signals import RouterLoad, RouterSignal, addon_signals, deployment_signals
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
    loads: list[RouterLoad] = field(default_factory=list)
    signals: dict[tuple[str, str], RouterSignal] = field(default_factory=dict)
    versions: dict[rollback.AddonKey, rollback.VersionRows] | None = None  # indexed on first ask per scrape
    addons: dict[tuple[str, str, str], RouterSignal] | None = None  # parsed on first ask per scrape
    answered: bool = True  # some router answered the last scrape (or none is configured)
    versions_known: bool = False  # the last scrape asked for the per-version counters, and every router answered
    unreadable: set[str] = field(default_factory=set)  # routers that answered what is not their load
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_cache = _RouterCache()


async def _router_urls(settings: AutoscalerSettings) -> list[str]:
    if settings.router_load_urls:
        return list(settings.router_load_urls)
    if settings.router_service is None:
        return []
    service, _, port = settings.router_service.partition(":")  # "name.namespace[:port]" (port: the router's)
    name, _, namespace = service.partition(".")
    pods = await asyncio.to_thread(
        kube().list_pods,
        namespace,
        {"app.kubernetes.io/name": "loraserve-router", "app.kubernetes.io/instance": name.removesuffix("-router")},
    )
    return [f"http://{ip}:{port or 8080}/load" for _, ip in ready_replicas(pods)]


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
        _cache.addons = addon_signals(_cache.loads)
    return _cache.addons


def latest_version_counters(addon: rollback.AddonKey) -> dict[str, rollback.Counters] | None:
    """Per version label of one (namespace, deployment, addon), from the last scrape: the routers' cumulative
    request, error and latency counters (the automatic rollback's input). None when the last scrape did not
    ask for them (no addon had a rule then, see VERSIONS_WANTED) or a router did not answer it: not known,
    which is not zero (a sum short of a router's counts, then whole again, would count all it ever served)."""
    if not _cache.versions_known:
        return None
    if _cache.versions is None:
        _cache.versions = rollback.versions_by_addon(_cache.loads)
    return rollback.version_counters(_cache.versions.get(addon, []))


async def _scrape(session: aiohttp.ClientSession, settings: AutoscalerSettings) -> None:
    async with _cache.lock:
        if time.monotonic() - _cache.at < settings.tick / 2:
            return
        loads = []
        unreadable: dict[str, str] = {}
        urls = await _router_urls(settings)
        # The per-version counters are most of the body (two histograms each): asked for only when read.
        query = {"versions": "1"} if any(wanted() for wanted in VERSIONS_WANTED) else None
        for url in urls:
            try:
                async with session.get(url, params=query, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        loads.append(RouterLoad.model_validate_json(await resp.read()))
                    else:
                        unreadable[url] = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError):
                pass  # a router replica that does not answer contributes nothing this tick
            except ValidationError as exc:  # another service at that address, or another format
                unreadable[url] = f"not a router's load ({exc.error_count()} errors)"
        for url in unreadable.keys() - _cache.unreadable:  # once, not every tick
            logging.getLogger(__name__).warning(f"router load at {url} not read: {unreadable[url]}")
        _cache.unreadable = set(unreadable)
        # In-flight counts add up over the routers: those that answered give a lower bound, which is known load.
        _cache.answered = bool(loads) or not urls
        _cache.loads = loads
        _cache.versions_known = query is not None and len(loads) == len(urls)
        _cache.signals = deployment_signals(loads)
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
# Asked before each scrape: whether something reads the per-version counters (an addon with a rollback rule).
VERSIONS_WANTED: list[Callable[[], bool]] = []
