"""A small async Kubernetes API client (aiohttp): requests, and list-then-watch of a collection.

Credentials come from the official client's loaders (kubeconfig or in-cluster service account), so
every auth form they support works; the bearer token is read again for each request, which picks up
rotated service-account tokens (the in-cluster loader refreshes them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


@dataclass
class KubeCredentials:
    host: str
    ssl_context: ssl.SSLContext | bool
    authorization: Callable[[], str | None]


def load_credentials(kubeconfig: str | None = None, in_cluster: bool = False) -> KubeCredentials:
    from kubernetes import client, config

    cfg = client.Configuration()
    if in_cluster:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    ctx: ssl.SSLContext | bool
    if str(cfg.host).startswith("https"):
        if cfg.verify_ssl:
            ctx = (
                ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
            )
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    else:
        ctx = False

    def authorization() -> str | None:
        # auth_settings() runs the loader's refresh hook (rotated service-account tokens, exec plugins).
        settings: Mapping[str, Mapping[str, Any]] = cfg.auth_settings()  # type: ignore[assignment]
        for setting in settings.values():
            if setting.get("in") == "header" and str(setting.get("key")).lower() == "authorization":
                value = setting.get("value")
                if value:
                    return str(value)
        return None

    return KubeCredentials(str(cfg.host).rstrip("/"), ctx, authorization)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class KubeClient:
    def __init__(self, creds: KubeCredentials) -> None:
        self.creds = creds
        self._session: aiohttp.ClientSession | None = None

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.creds.authorization()
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.creds.ssl_context))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
        time_limit: float = 10.0,
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        async with self.session.request(
            method,
            self.creds.host + path,
            data=data,
            params=params,
            headers=self._headers(content_type or ("application/json" if data is not None else None)),
            timeout=aiohttp.ClientTimeout(total=time_limit),
        ) as resp:
            raw = await resp.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            return resp.status, payload

    async def list_and_watch(
        self,
        path: str,
        on_reset: Callable[[dict[tuple[str, str], dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        *,
        label_selector: str | None = None,
        watch_timeout: int = 290,
        stop: asyncio.Event | None = None,
    ) -> None:
        """List `path`, hand every object to `on_reset`, then watch and hand each change to `on_event`;
        relist on 410 Gone or any failure (with backoff). Runs until cancelled or `stop` is set."""
        backoff = 0.5
        while stop is None or not stop.is_set():
            try:
                rv: str | None = await self._list(path, on_reset, label_selector)
                backoff = 0.5
                while rv is not None and (stop is None or not stop.is_set()):
                    rv = await self._watch(path, rv, on_event, label_selector, watch_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch %s failed (%s); relisting in %.1fs", path, exc, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 30.0)

    async def _list(
        self,
        path: str,
        on_reset: Callable[[dict[tuple[str, str], dict[str, Any]]], None],
        label_selector: str | None,
    ) -> str:
        params = {"labelSelector": label_selector} if label_selector else None
        status, payload = await self.request("GET", path, params=params, time_limit=30.0)
        if status != 200 or not isinstance(payload, dict):
            raise ApiError(status, str(payload)[:200])
        objects: dict[tuple[str, str], dict[str, Any]] = {}
        for item in payload.get("items") or []:
            meta = item.get("metadata") or {}
            objects[(meta.get("namespace") or "", meta.get("name") or "")] = item
        on_reset(objects)
        return str((payload.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(
        self,
        path: str,
        rv: str | None,
        on_event: Callable[[str, dict[str, Any]], None],
        label_selector: str | None,
        watch_timeout: int,
    ) -> str | None:
        params = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(watch_timeout),
        }
        if rv:
            params["resourceVersion"] = rv
        if label_selector:
            params["labelSelector"] = label_selector
        async with self.session.get(
            self.creds.host + path,
            params=params,
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=watch_timeout + 30, sock_connect=10),
        ) as resp:
            if resp.status == 410:
                return None
            if resp.status != 200:
                raise ApiError(resp.status, (await resp.text())[:200])
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiError(int(obj.get("code") or 500), str(obj.get("message"))[:200])
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    on_event(kind, obj)
        return rv
