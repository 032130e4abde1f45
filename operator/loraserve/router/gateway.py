"""The router's request handling: thin glue from HTTP to the pure decisions and the upstream client.

POST /v1/completions and /v1/chat/completions: authenticate, parse the body, resolve `model` (pure:
model_names), pick the adapter version (pure: balancer), rewrite `model` to the served name, pick a replica
(pure: balancer) or hold the request until one is ready (hold), then stream the replica's response back as
it arrives. GET /v1/models, /health, /metrics, /load (the operator's feed) and /openapi.json answer from
memory (/metrics and /load can move to a port of their own: `serve_metrics=False` here and a `MetricsHandler`
server there).

Failures, as a client sees them:
- The body must be strict JSON (jsonbody): too deep or non-standard numbers are a 400, never a 500.
- A replica that takes nothing from us (connect refused or timed out) or breaks the connection before a
  single byte of its answer came back is not the end: the request goes to another ready replica (up to
  `max_retries` of them). A pooled keep-alive connection the replica had already closed is retried once on
  a fresh connection to the same replica. Once any byte of the answer was received, never: the replica may
  have acted on the request.
- One watchdog task per gateway, not a timer per request, checks every exchange: no response head within
  `head_timeout` is a 504; a response that started and then received nothing for `stream_idle_timeout` is
  cut off. A server-sent-event stream that is cut off (stalled, or the replica died) ends with an error
  event, `data: {"error": {...}}`, which the OpenAI SDKs raise as an APIError, and a proper end of the
  chunked body; any other body cut short is aborted so it cannot look complete.
- Error bodies name deployments, never a replica's address (that goes to the log).
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
    error_body,
    not_found,
    too_many,
    unauthorized,
    unavailable,
)
from loraserve.router.hold import DeploymentGone, HoldQueue, RouterStopping, Waker
from loraserve.router.httpserver import Connection, Request, encode_headers
from loraserve.router.jsonbody import DEFAULT_MAX_DEPTH, parse_json
from loraserve.router.metrics import RouterMetrics, Series
from loraserve.router.model_names import Deployments, VisibleDeployments, model_ids, parse_model, resolve
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
    stream_idle_timeout: float = 300.0  # response started -> silence that cuts it off (0: never)
    max_retries: int = 2  # other replicas tried when one received nothing
    max_held_per_deployment: int = 10000
    max_json_depth: int = DEFAULT_MAX_DEPTH
    wake_interval: float = 2.0  # least seconds between two wakes of one deployment
    access_log: bool = False
    serve_metrics: bool = True  # /metrics on the API port too (False: only on the metrics port)


class _NothingReceived(Exception):
    """The replica failed before sending a byte of its answer: the request may go to another one."""


class _Stalled(Exception):
    """The replica sent nothing for too long."""


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
        "reads",
        "seen_at",
        "seen_reads",
        "series",
        "sse",
        "started",
        "status",
        "t0",
        "tail",
        "upstream",
    )

    def __init__(
        self, client: Connection, extra: bytes, series: Series, t0: float, upstream: UpstreamConnection, now: float
    ) -> None:
        self.client = client
        self.extra = extra
        self.series = series
        self.t0 = t0
        self.upstream = upstream
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.started = False
        self.sse = False
        self.first_byte = False
        self.tail = b""
        self.reads = 0  # reads from the replica so far; the watchdog compares it with what it last saw
        self.seen_reads = 0
        self.seen_at = now

    def begin(self) -> None:
        self.reads += 1
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
            if name == b"content-type" and value.startswith(b"text/event-stream"):
                self.sse = True
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
            self._cut(f"The model server broke the response off ({_reason(exc)}).", "upstream_disconnected")
        elif self.reads == 0:
            exc = _NothingReceived(str(exc))
        if not self.done.done():
            self.done.set_exception(exc)

    def _cut(self, message: str, code: str) -> None:
        """End a response that cannot be completed: an SSE stream with an error event, anything else abruptly."""
        client = self.client
        if self.sse and client.streaming:
            sep = b"" if not self.tail or self.tail.endswith(b"\n\n") else b"\n\n"  # end a half-sent event
            client.write(sep + b"data: " + error_body(message, "server_error", None, code) + b"\n\n")
            client.finish()
        else:
            client.abort()  # a cut-off body must not look complete to the client

    def stalled(self, seconds: float) -> None:
        """The watchdog saw nothing from the replica for `seconds`."""
        self.upstream.abort()  # no more callbacks from it
        if self.started:
            self._cut(f"The model server sent nothing for {seconds:g}s; the stream was ended.", "upstream_stalled")
        if not self.done.done():
            self.done.set_exception(_Stalled())


def _reason(exc: BaseException) -> str:
    """What went wrong, without the replica's address."""
    return "connection closed" if "closed" in str(exc) else "malformed response"


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
        self._active: set[_ProxySink] = set()
        self._watchdog: asyncio.Task[None] | None = None
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
            b"/load": (b"GET", self._load),
            b"/openapi.json": (b"GET", self._openapi_doc),
        }
        if not self.config.serve_metrics:
            del self._routes[b"/metrics"]
            del self._routes[b"/load"]

    def _count_wake(self, key: tuple[str, str]) -> None:
        self.metrics.wake(*key)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        await self.holds.close()
        self.pool.close()

    async def _watch(self) -> None:
        """Every exchange's deadlines, checked a few times per shortest timeout (see the module doc)."""
        cfg = self.config
        limits = [t for t in (cfg.head_timeout, cfg.stream_idle_timeout) if t > 0]
        tick = max(0.01, min(1.0, min(limits, default=4.0) / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for sink in list(self._active):
                if sink.reads != sink.seen_reads:
                    sink.seen_reads = sink.reads
                    sink.seen_at = now
                    continue
                limit = cfg.stream_idle_timeout if sink.started else cfg.head_timeout
                if limit > 0 and now - sink.seen_at >= limit:
                    self._active.discard(sink)
                    sink.stalled(limit)

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
        body = parse_json(request.body, self.config.max_json_depth)
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
            visible=key.allows if key is not None else None,  # out of scope = absent: no probing by 403 vs 404
        )
        state = res.deployment
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

        if key is not None:
            assert self.keys is not None
            limit = self.keys.acquire(key)  # counted per key name: see auth
            if limit is not None:
                raise too_many(limit)
        series = self.metrics.series(state.namespace, state.name, res.addon, label)
        series.in_flight += 1
        series.accepted()
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
                assert self.keys is not None
                self.keys.release(key.name)
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
        fresh = False  # after a pooled connection failed: a new connection to the same replica, once
        stale_retried = False
        where = f"{state.namespace}/{state.name}"
        while True:
            if fresh:
                replica = failed.pop()
                replica.in_flight += 1
            else:
                chosen = choose_replica(state.replicas.values(), adapter, failed)
                if chosen is not None:
                    replica = chosen
                    replica.in_flight += 1
                elif failed:
                    raise bad_gateway(f"No replica of {where} could be reached")
                else:
                    replica = await self._hold(state, adapter, series)
            try:
                try:
                    upstream = await self.pool.acquire(replica.host, replica.port, fresh=fresh)
                except ConnectError as exc:
                    log.warning("%s: replica %s unreachable: %s", where, replica.url, exc)
                    failed.append(replica)
                    fresh = False
                else:
                    reused = upstream.reused
                    try:
                        return await self._exchange(request, conn, upstream, replica, payload, series, extra, t0)
                    except _NothingReceived as exc:
                        failed.append(replica)
                        fresh = reused and not stale_retried  # the replica may just have closed an idle one
                        stale_retried |= fresh
                        log.warning("%s: replica %s answered nothing (%s); retrying", where, replica.url, exc)
                        if fresh:
                            series.retries += 1
                            continue
                if len(failed) > self.config.max_retries:
                    raise bad_gateway(f"No replica of {where} could be reached")
                series.retries += 1
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
        except RouterStopping:
            raise unavailable(
                "The router is restarting; retry (the request was not sent to any replica)",
                code="router_restarting",
                retry_after=1,
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
        loop = asyncio.get_running_loop()
        sink = _ProxySink(conn, extra, series, t0, upstream, loop.time())
        conn.on_pause = upstream.pause
        conn.on_resume = upstream.resume
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch())
        self._active.add(sink)
        upstream.send(head + b"\r\n" + payload, sink)
        where = f"{replica.deployment[0]}/{replica.deployment[1]}"
        try:
            await sink.done
        except asyncio.CancelledError:
            upstream.abort()  # the client went away: so does the request to the replica
            raise
        except _Stalled:
            if sink.started:
                return 504
            log.warning("replica %s sent no response head in %gs", replica.url, self.config.head_timeout)
            raise RouterError(
                504,
                f"A replica of {where} sent no response in {self.config.head_timeout:g}s",
                code="upstream_timeout",
            ) from None
        except _NothingReceived:
            raise
        except UpstreamError as exc:
            log.warning("replica %s failed: %s", replica.url, exc)
            if sink.started:
                return 502
            raise bad_gateway(f"A replica of {where} broke the response off before it started") from None
        finally:
            self._active.discard(sink)
            conn.on_pause = None
            conn.on_resume = None
        return sink.status

    # -- the rest

    async def _models(self, request: Request, conn: Connection) -> None:
        key = self._authenticate(request)
        data: list[dict[str, Any]] = []
        store: Deployments = VisibleDeployments(self.store, key.allows) if key is not None else self.store
        for state in store.all():
            qualified = len(store.by_name(state.name)) > 1
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
        conn.send(200, await self.metrics.render_aside(), content_type=CONTENT_TYPE_LATEST)

    async def _load(self, request: Request, conn: Connection) -> None:
        conn.send(200, await self.metrics.load_aside(versions=wants_versions(request)))

    async def _openapi_doc(self, request: Request, conn: Connection) -> None:
        conn.send(200, self._openapi)


def wants_versions(request: Request) -> bool:
    """GET /load?versions=1: with the per-version counters (the automatic rollback's input)."""
    return b"versions=1" in request.query.split(b"&")


class MetricsHandler:
    """The metrics port: GET /metrics, GET /load (the operator's feed of the same numbers) and /health (for
    probes), nothing else."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def handle(self, request: Request, conn: Connection) -> None:
        if request.path == b"/metrics" and request.method == b"GET":
            conn.send(200, await self.gateway.metrics.render_aside(), content_type=CONTENT_TYPE_LATEST)
        elif request.path == b"/load" and request.method == b"GET":
            conn.send(200, await self.gateway.metrics.load_aside(versions=wants_versions(request)))
        elif request.path == b"/health" and request.method == b"GET":
            conn.send(200, b'{"status":"ok"}')
        else:
            err = RouterError(404, "Only GET /metrics, /load and /health are served on this port", code="not_found")
            conn.send(err.status, err.body())
