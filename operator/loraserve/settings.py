"""The operator's settings: read from the environment once, at start, and checked there, so a malformed value
stops the start naming the variable instead of failing every reconcile."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loraserve import peering
from loraserve.durations import parse_window
from loraserve.resources.settings import ManifestSettings


@dataclass(frozen=True)
class AutoscalerSettings:
    tick: float = 2.0
    router_load_urls: tuple[str, ...] = ()  # each router replica's GET /load
    router_service: str | None = None  # "name.namespace[:port]": read /load of every ready router pod behind it
    idle_delete_after: float = 7 * 86400.0
    # status.gpuSeconds when only the meter moved (the Prometheus counter is live): the whole idle API cost
    # of a Deployment with ready replicas, one status write per this long.
    gpu_meter_every: float = 300.0


@dataclass(frozen=True)
class OperatorSettings:
    manifests: ManifestSettings = field(default_factory=ManifestSettings)
    autoscaler: AutoscalerSettings = field(default_factory=AutoscalerSettings)
    addon_idle_unload_after: float = 7 * 86400.0
    serverless_pool_gc_after: float = 600.0
    serverless_pool_spec: Mapping[str, Any] = field(default_factory=dict)
    model_server_key_file: str | None = None
    peering_lifetime: int = 10  # seconds (see loraserve.peering)
    # The slow resync of an object nothing woke (spread +-20 %): it only heals what a lost watch event or a hand
    # edit of an unwatched child (the Service) would leave behind, and asks each replica what it has loaded.
    resync_every: float = 1800.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Raises ValueError naming the variable and what it should be."""
        env = dict(os.environ) if env is None else dict(env)
        if env.get("LORASERVE_ROUTER_METRICS_URLS"):
            raise ValueError(
                "LORASERVE_ROUTER_METRICS_URLS: replaced by LORASERVE_ROUTER_LOAD_URLS, each router's /load "
                "(the same host and port as its /metrics, e.g. http://router:9090/load)"
            )
        urls = tuple(u for u in env.get("LORASERVE_ROUTER_LOAD_URLS", "").split(",") if u)
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"LORASERVE_ROUTER_LOAD_URLS: {url!r} is not an http(s) URL")
        tick_text = env.get("LORASERVE_AUTOSCALE_TICK", "2")
        try:
            tick = float(tick_text)
        except ValueError:
            tick = 0.0
        if not 0.1 <= tick <= 60:
            raise ValueError(f"LORASERVE_AUTOSCALE_TICK: seconds between 0.1 and 60, got {tick_text!r}")
        gpu_meter_every = _window(env, "LORASERVE_GPU_METER_INTERVAL", "5m")
        if gpu_meter_every < 10:
            raise ValueError("LORASERVE_GPU_METER_INTERVAL: at least 10s")
        resync_every = _window(env, "LORASERVE_RESYNC_INTERVAL", "30m")
        if resync_every < 60:
            raise ValueError("LORASERVE_RESYNC_INTERVAL: at least 1m")
        pool_spec_text = env.get("LORASERVE_SERVERLESS_POOL_SPEC", "") or "{}"
        try:
            pool_spec = json.loads(pool_spec_text)
        except ValueError as exc:
            raise ValueError(f"LORASERVE_SERVERLESS_POOL_SPEC: not JSON ({exc})") from None
        if not isinstance(pool_spec, dict):
            raise ValueError("LORASERVE_SERVERLESS_POOL_SPEC: a JSON object of Deployment spec fields")
        return cls(
            manifests=ManifestSettings.from_env(env),
            autoscaler=AutoscalerSettings(
                tick=tick,
                router_load_urls=urls,
                router_service=env.get("LORASERVE_ROUTER_METRICS_SERVICE") or None,
                idle_delete_after=_window(env, "LORASERVE_IDLE_DELETE_AFTER", "168h"),
                gpu_meter_every=gpu_meter_every,
            ),
            addon_idle_unload_after=_window(env, "LORASERVE_ADDON_IDLE_UNLOAD_AFTER", "168h"),
            serverless_pool_gc_after=_window(env, "LORASERVE_SERVERLESS_POOL_GC_AFTER", "10m"),
            serverless_pool_spec=pool_spec,
            model_server_key_file=env.get("LORASERVE_MODEL_SERVER_KEY_FILE") or None,
            peering_lifetime=peering.lifetime(env),
            resync_every=resync_every,
        )


def _window(env: Mapping[str, str], key: str, default: str) -> float:
    text = env.get(key, "") or default
    try:
        return parse_window(text)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


_current: OperatorSettings | None = None


def operator_settings() -> OperatorSettings:
    """The settings the operator started with (read on first use where no start set them: in-process tests)."""
    global _current
    if _current is None:
        _current = OperatorSettings.from_env()
    return _current


def use_settings(settings: OperatorSettings) -> None:
    global _current
    _current = settings
