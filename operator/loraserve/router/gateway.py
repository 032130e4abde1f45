"""The router's request handling: thin glue from HTTP to the pure decisions and the upstream client.

POST /v1/completions and /v1/chat/completions: authenticate, parse the body, resolve `model` (pure:
model_names), pick the adapter version (pure: balancer), rewrite `model` to the served name, pick a replica
(pure: balancer) or hold the request until one is ready (hold), then stream the replica's response back as
it arrives. GET /v1/models, /health, /metrics and /openapi.json answer from memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from loraserve.router import openapi
from loraserve.router.auth import ApiKey, KeyRing
from loraserve.router.balancer import choose_replica, pick_version
from loraserve.router.errors import (
    RouterError,
    bad_gateway,
    bad_request,
    forbidden,
    not_found,
    too_many,
    unauthorized,
    unavailable,
)
from loraserve.router.hold import DeploymentGone, HoldQueue, Waker
from loraserve.router.httpserver import Connection, Request, encode_headers
from loraserve.router.metrics import RouterMetrics, Series
from loraserve.router.model_names import model_ids, parse_model, resolve
from loraserve.router.prompts import apply_system_prompt
from loraserve.router.topology import DeploymentState, Replica, TopologyStore
from loraserve.router.upstream import ConnectError, RawHeaders, UpstreamConnection, UpstreamError, UpstreamPool
from loraserve.tokens import ModelServerTokens

log = logging.getLogger("loraserve.router")
access_log = logging.getLogger("loraserve.router.access")

MiB = 1024 * 1024
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-connection",
        b"server",
        b"date",
    }
)
_USAGE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TAIL = 4096
_PROXY_PATHS = (b"/v1/completions", b"/v1/chat/completions")


@dataclass(slots=True)
class RouterConfig:
    max_body_bytes: int = 4 * MiB
    key_concurrency: int | None = None  # default per-key limit of requests at once (None: unlimited)
    connect_timeout: float = 3.0
    head_timeout: float = 900.0  # request sent -> response head from the replica
    max_retries: int = 2  # other replicas tried after a connect failure
    max_held_per_deployment: int = 10000
    wake_interval: float = 2.0  # least seconds between two wakes of one deployment
    access_log: bool = False


def deprecation_headers(canonical: str) -> tuple[tuple[str, str], ...]:
    escaped = canonical.replace("\\", "\\\\").replace('"', '\\"')
    return (
        ("deprecation", "true"),
        ("warning", f'299 - "deployedModel is deprecated; use model=\\"{escaped}\\""'),
    )


class _ProxySink:
    """Receives the replica's response (upstream callbacks) and writes it to the client as it comes."""

    __slots__ = (
        "client",
        "done",
        "extra",
        "first_byte",
        "series",
        "started",
        "status",
        "t0",
        "tail",
        "upstream",
    )

    def __init__(
        self, client: Connection, extra: bytes, series: Series, t0: float, upstream: UpstreamConnection
    ) -> None:
        self.client = client
        self.extra = extra
        self.series = series
        self.t0 = t0
        self.upstream = upstream
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.started = False
        self.first_byte = False
        self.tail = b""

    def begin(self) -> None:
        self.client.cork()

    def end(self) -> None:
        self.client.uncork()

    def on_head(self, status: int, headers: RawHeaders) -> None:
        self.status = status
        length: int | None = None
        chunked = False
        out = []
        for name, value in headers:
            if name in _HOP_BY_HOP:
                if name == b"content-length" and value.isdigit():
                    length = int(value)
                elif name == b"transfer-encoding" and value.lower() != b"identity":
                    chunked = True
                continue
            out.append(name + b": " + value + b"\r\n")
        if chunked:
            length = None
        self.started = True
        self.client.start(status, b"".join(out) + self.extra, length)
        if length == 0:
            self._first()

    def _first(self) -> None:
        self.first_byte = True
        if self.status < 400:  # an error body is not a first token
            self.series.ttft.observe(time.perf_counter() - self.t0)

    def on_body(self, data: bytes) -> None:
        if not self.first_byte:
            self._first()
        self.client.write(data)
        tail = self.tail + data if self.tail else data
        self.tail = tail[-_TAIL:] if len(tail) > _TAIL else tail

    def on_complete(self) -> None:
        self.client.finish()
        if self.tail:
            found = _USAGE.findall(self.tail)
            if found:
                self.series.output_tokens += int(found[-1])
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, exc: BaseException) -> None:
        if self.started:
            self.client.abort()  # a cut-off body must not look complete to the client
        if not self.done.done():
            self.done.set_exception(exc)

    def head_timeout(self) -> None:
        if not self.started:
            self.upstream.abort()
            if not self.done.done():
                self.done.set_exception(TimeoutError("no response head from the replica in time"))


class Gateway:
    """Implements `httpserver.Handler`."""

    def __init__(
        self,
        store: TopologyStore,
        waker: Waker,
        *,
        keys: KeyRing | None = None,
        config: RouterConfig | None = None,
        metrics: RouterMetrics | None = None,
        tokens: ModelServerTokens | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens or ModelServerTokens()  # each replica demands its Deployment's token
        self.keys = keys
        self.config = config or RouterConfig()
        self.metrics = metrics or RouterMetrics()
        self.holds = HoldQueue(store, waker, min_wake_interval=self.config.wake_interval, on_wake=self._count_wake)
        self.pool = UpstreamPool(connect_timeout=self.config.connect_timeout)
        self._openapi = openapi.render().encode()
        self._started = int(time.time())
        # /health answers 503 until this says the topology was loaded once (the first list of every watch).
        self.ready: Callable[[], bool] = lambda: True
        self._routes: dict[bytes, tuple[bytes, Callable[[Request, Connection], Any]]] = {
            b"/v1/completions": (b"POST", self._proxy),
            b"/v1/chat/completions": (b"POST", self._proxy),
            b"/v1/models": (b"GET", self._models),
            b"/health": (b"GET", self._health),
            b"/metrics": (b"GET", self._metrics),
            b"/openapi.json": (b"GET", self._openapi_doc),
        }

    def _count_wake(self, key: tuple[str, str]) -> None:
        self.metrics.wake(*key)

    async def close(self) -> None:
        await self.holds.close()
        self.pool.close()

    # -- entry

    async def handle(self, request: Request, conn: Connection) -> None:
        route = self._routes.get(request.path)
        try:
            if route is None:
                raise RouterError(404, f"no route for {request.path.decode('latin-1')[:200]}", code="not_found")
            method, fn = route
            if request.method != method:
                raise RouterError(
                    405,
                    f"method {request.method.decode('latin-1')} not allowed here",
                    code="method_not_allowed",
                    headers=(("allow", method.decode()),),
                )
            await fn(request, conn)
        except RouterError as err:
            self.metrics.reject(err.status)
            conn.send(err.status, err.body(), headers=err.headers)
            if self.config.access_log:
                access_log.info("%s %s %d", request.method.decode(), request.path.decode("latin-1"), err.status)

    # -- auth

    def _authenticate(self, request: Request) -> ApiKey | None:
        if self.keys is None:
            return None
        key = self.keys.authenticate(request.headers.get(b"authorization"))
        if key is None:
            raise unauthorized()
        return key

    # -- proxy

    async def _proxy(self, request: Request, conn: Connection) -> None:
        t0 = time.perf_counter()
        key = self._authenticate(request)
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            raise bad_request("We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        model = body.get("model")
        deployed = body.pop("deployedModel", None)
        if not isinstance(model, str) or not model:
            raise bad_request("you must provide a model parameter", param="model", code="missing_model")
        if deployed is not None and not isinstance(deployed, str):
            raise bad_request("deployedModel must be a string", param="deployedModel")
        ref = parse_model(model, deployed)
        res = resolve(
            ref,
            self.store,
            legacy=deployed is not None,
            namespace_allowed=key.allows_namespace if key is not None else None,
        )
        state = res.deployment
        if key is not None:
            if not key.allows(state.namespace, state.name):
                raise forbidden(f"This API key may not use deployment {state.namespace}/{state.name}")
            assert self.keys is not None
            limit = self.keys.limit_for(key)
            if limit is not None and key.in_flight >= limit:
                raise too_many(limit)
        user = body.get("user")
        adapter: str | None = None
        label: str | None = None  # the version label of the metrics (automatic rollback compares by it)
        if res.addon is not None:
            version = pick_version(res.addon, res.versions, user if isinstance(user, str) else None)
            if version is None:
                raise unavailable(
                    f"addon {res.addon!r} on {state.namespace}/{state.name} has no version with a known "
                    "ModelVersion yet",
                    code="addon_not_ready",
                )
            adapter, label = version.served_name, version.version
            body["model"] = adapter
            if request.path == b"/v1/chat/completions":
                apply_system_prompt(body, version.system_prompt, version.prompt_policy)
        else:
            body["model"] = state.view.base_model
        try:
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # lone surrogates (from \ud800-style escapes): keep them escaped
            payload = json.dumps(body, separators=(",", ":")).encode()
        legacy = deprecation_headers(res.canonical) if res.legacy else ()
        extra = encode_headers(legacy) if legacy else b""

        series = self.metrics.series(state.namespace, state.name, res.addon, label)
        series.in_flight += 1
        series.accepted()
        if key is not None:
            key.in_flight += 1
        code = 500
        try:
            code = await self._dispatch(request, conn, state, adapter, payload, series, extra, t0)
        except RouterError as err:
            code = err.status
            if not conn.responded:
                conn.send(err.status, err.body(), headers=err.headers + legacy)
        except asyncio.CancelledError:
            code = 499  # the client went away (nginx's code for it)
            raise
        finally:
            if key is not None:
                key.in_flight -= 1
            series.in_flight -= 1
            series.finished(code)
            series.duration.observe(time.perf_counter() - t0)
            if self.config.access_log:
                access_log.info(
                    "%s %s %d %s/%s addon=%s key=%s %.1fms",
                    request.method.decode(),
                    request.path.decode("latin-1"),
                    code,
                    state.namespace,
                    state.name,
                    res.addon or "-",
                    key.name if key is not None else "-",
                    (time.perf_counter() - t0) * 1000,
                )

    async def _dispatch(
        self,
        request: Request,
        conn: Connection,
        state: DeploymentState,
        adapter: str | None,
        payload: bytes,
        series: Series,
        extra: bytes,
        t0: float,
    ) -> int:
        failed: list[Replica] = []
        while True:
            replica = choose_replica(state.replicas.values(), adapter, failed)
            if replica is not None:
                replica.in_flight += 1
            elif failed:
                raise bad_gateway(f"no replica of {state.namespace}/{state.name} could be reached")
            else:
                replica = await self._hold(state, adapter, series)
            try:
                upstream = await self.pool.acquire(replica.host, replica.port)
            except ConnectError as exc:
                replica.in_flight -= 1
                failed.append(replica)
                if len(failed) > self.config.max_retries:
                    raise bad_gateway(f"no replica of {state.namespace}/{state.name} could be reached: {exc}") from None
                series.retries += 1
                continue
            try:
                return await self._exchange(request, conn, upstream, replica, payload, series, extra, t0)
            finally:
                replica.in_flight -= 1

    async def _hold(self, state: DeploymentState, adapter: str | None, series: Series) -> Replica:
        if self.holds.count(state.key) >= self.config.max_held_per_deployment:
            raise unavailable(
                f"too many requests are waiting for {state.namespace}/{state.name} to become ready",
                code="too_many_held",
                retry_after=5,
            )
        timeout = state.view.scale_from_zero_timeout
        held = self.holds.hold(state.key, adapter)
        series.held += 1
        series.holds += 1
        try:
            return await self.holds.wait(held, timeout)
        except TimeoutError:
            series.hold_timeouts += 1
            what = f" with adapter {adapter!r} loaded" if adapter else ""
            raise unavailable(
                f"deployment {state.namespace}/{state.name} has no ready replica{what} after waiting "
                f"{timeout:g}s (scale from zero); retry later",
                code="scale_from_zero_timeout",
            ) from None
        except DeploymentGone:
            raise not_found(
                f"The deployment {state.namespace}/{state.name} was deleted", code="deployment_not_found"
            ) from None
        finally:
            series.held -= 1

    async def _exchange(
        self,
        request: Request,
        conn: Connection,
        upstream: UpstreamConnection,
        replica: Replica,
        payload: bytes,
        series: Series,
        extra: bytes,
        t0: float,
    ) -> int:
        host = replica.host if ":" not in replica.host else f"[{replica.host}]"
        head = (
            request.method
            + b" "
            + request.path
            + b" HTTP/1.1\r\nhost: "
            + f"{host}:{replica.port}".encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(payload)).encode()
            + b"\r\n"
        )
        rid = request.headers.get(b"x-request-id")
        if rid is not None:
            head += b"x-request-id: " + rid + b"\r\n"
        head += self.tokens.header_line(*replica.deployment)
        sink = _ProxySink(conn, extra, series, t0, upstream)
        conn.on_pause = upstream.pause
        conn.on_resume = upstream.resume
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.config.head_timeout, sink.head_timeout)
        upstream.send(head + b"\r\n" + payload, sink)
        try:
            await sink.done
        except asyncio.CancelledError:
            upstream.abort()  # the client went away: so does the request to the replica
            raise
        except TimeoutError:
            raise RouterError(504, f"replica {replica.url} sent no response in time", code="upstream_timeout") from None
        except UpstreamError as exc:
            if sink.started:
                return sink.status
            raise bad_gateway(f"replica of {replica.url} failed: {exc}") from None
        finally:
            timer.cancel()
            conn.on_pause = None
            conn.on_resume = None
        return sink.status

    # -- the rest

    async def _models(self, request: Request, conn: Connection) -> None:
        key = self._authenticate(request)
        data: list[dict[str, Any]] = []
        for state in self.store.all():
            if key is not None and not key.allows(state.namespace, state.name):
                continue
            qualified = len(self.store.by_name(state.name)) > 1
            for ident, addon in model_ids(state):
                if qualified:
                    left, sep, _ = ident.partition("#")
                    dep = f"accounts/{state.namespace}/deployments/{state.name}"
                    ident = f"accounts/{state.namespace}/models/{left}#{dep}" if sep else dep
                versions = state.view.addons.get(addon, ()) if addon else ()
                data.append(
                    {
                        "id": ident,
                        "object": "model",
                        "created": self._started,
                        "owned_by": state.namespace,
                        "root": state.view.base_model,
                        "parent": f"{state.view.base_model}#{state.name}" if addon else None,
                        "deployment": f"accounts/{state.namespace}/deployments/{state.name}",
                        "ready_replicas": len(state.replicas),
                        "versions": [
                            {"name": v.served_name, "version": v.version, "weight": v.weight} for v in versions
                        ]
                        if addon
                        else None,
                    }
                )
        conn.send(200, json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode())

    async def _health(self, request: Request, conn: Connection) -> None:
        if self.ready():
            conn.send(200, b'{"status":"ok"}')
        else:
            conn.send(503, b'{"status":"starting"}', headers=(("retry-after", "1"),))

    async def _metrics(self, request: Request, conn: Connection) -> None:
        conn.send(200, self.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    async def _openapi_doc(self, request: Request, conn: Connection) -> None:
        conn.send(200, self._openapi)
