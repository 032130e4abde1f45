"""A small HTTP/1.1 server on asyncio protocols (httptools' llhttp parser), made for a proxy's hot path.

One `Connection` per client socket. Requests are parsed in C; each complete request runs as one task
through `Handler.handle(request, connection)`; requests pipelined behind it wait (reading is paused).
The handler answers with `send()` (a whole response) or `start()` / `write()` / `finish()` (chunked
transfer, what SSE streams use). A client that goes away cancels the running handler task, which is how a
disconnect reaches the upstream request. A client that half-closes (FIN) counts as gone, as with nginx:
TCP cannot tell it from one that closed for good, and a request nobody reads must not keep a GPU busy.

Everything a client can make the router hold is bounded (`Limits`): the request target (414) and the
header block (431) by size and count; a body by `max_body` (413, before it is read when the length is
declared) and, together with every other body being read, held or forwarded, by one shared `BodyBudget`
(503 with Retry-After); the number of connections (503, then closed); and time: the head must arrive within
`header_timeout` of its first byte and the body within `body_timeout` of the head (408, then closed), and an
idle keep-alive connection is closed after `idle_timeout`. Deadlines are checked by one sweeper task per
server rather than a timer per request: the hot path only stores a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from loraserve.router.errors import RouterError, too_large, unavailable

log = logging.getLogger(__name__)

Headers = Iterable[tuple[str, str]]

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in _REASONS.items()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HIGH_WATER = 256 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may make the server hold. Sizes in bytes, times in seconds (0: no limit)."""

    max_body: int = 4 * 1024 * 1024
    max_target: int = 8 * 1024  # the request target (path and query)
    max_header_bytes: int = 32 * 1024  # all header names and values together
    max_headers: int = 100
    header_timeout: float = 10.0  # first byte of a request -> end of its head
    body_timeout: float = 60.0  # end of the head -> end of the body
    idle_timeout: float = 75.0  # a keep-alive connection with nothing to do
    max_connections: int = 10000

    def tick(self) -> float:
        """How often the sweeper looks: a fraction of the shortest deadline, within [10 ms, 1 s]."""
        shortest = min((t for t in (self.header_timeout, self.body_timeout, self.idle_timeout) if t > 0), default=1.0)
        return max(0.01, min(1.0, shortest / 4))


class BodyBudget:
    """One pool of bytes for every request body in memory: being read, waiting behind another request,
    held until a deployment wakes, or being forwarded. A body that does not fit is refused (503)."""

    __slots__ = ("capacity", "used")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # 0: unbounded
        self.used = 0

    def take(self, n: int) -> bool:
        if self.capacity and self.used + n > self.capacity:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


def _give_back(budget: BodyBudget, n: int, _task: object) -> None:
    budget.give(n)


def over_budget() -> RouterError:
    return unavailable(
        "The router is holding as many request bodies as its memory budget allows; retry shortly",
        code="router_busy",
        retry_after=1,
    )


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


def encode_headers(headers: Headers) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)


class Request:
    __slots__ = ("body", "charged", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        headers: dict[bytes, bytes],
        body: bytes,
        keep_alive: bool,
        charged: int = 0,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case names; a repeated header keeps its last value
        self.body = body
        self.keep_alive = keep_alive
        self.charged = charged  # bytes taken from the body budget, given back when the request is done


class Handler(Protocol):
    async def handle(self, request: Request, conn: Connection) -> None: ...


class _Reject(Exception):
    def __init__(self, error: RouterError) -> None:
        super().__init__(error.message)
        self.error = error


_IDLE, _HEAD, _BODY, _BUSY = 0, 1, 2, 3  # what a connection waits for (the sweeper's view)


class Connection(asyncio.Protocol):
    """One client connection. Not reused across sockets."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        budget: BodyBudget | None = None,
        on_close: Callable[[Connection], None] | None = None,
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._max_body = limits.max_body
        self._budget = budget if budget is not None else BodyBudget(0)
        self._on_close = on_close
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._size = 0
        self._charged = 0  # bytes of the body being read, taken from the budget
        self._pending: deque[Request] = deque()
        self._reading = _IDLE  # _HEAD or _BODY while a request is being read
        self.phase = _IDLE
        self.deadline = self._loop.time() + limits.idle_timeout if limits.idle_timeout else 0.0
        self._task: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.on_pause: Callable[[], None] | None = None  # the current exchange's upstream flow control
        self.on_resume: Callable[[], None] | None = None
        self.closed = False
        self._keep_alive = True
        self._responded = False
        self._streaming = False
        self._corked: list[bytes] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._refuse(cause.error)
            else:  # pragma: no cover - a bug in a callback
                log.exception("HTTP parser callback failed")
                self._refuse(RouterError(500, "internal error"))
        except httptools.HttpParserUpgrade:
            self._refuse(RouterError(400, "protocol upgrades are not supported", code="invalid_request"))
        except httptools.HttpParserError:
            self._refuse(RouterError(400, "malformed HTTP request", code="invalid_request"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._budget.give(self._charged + sum(r.charged for r in self._pending))
        self._charged = 0
        self._pending.clear()
        if self._on_close is not None:
            self._on_close(self)

    def expire(self, now: float) -> None:
        """Called by the sweeper when `deadline` has passed."""
        if self.closed or self.transport is None:
            return
        if self.phase == _IDLE:
            self.transport.close()  # a keep-alive connection nobody uses: no answer owed
        elif self.phase in (_HEAD, _BODY):
            what = "request head" if self.phase == _HEAD else "request body"
            self._refuse(RouterError(408, f"The {what} did not arrive in time", code="request_timeout"))

    def pause_writing(self) -> None:
        self._can_write.clear()
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self.on_resume is not None:
            self.on_resume()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._size = 0
        self._reading = _HEAD
        if self.phase != _BUSY:
            self.phase = _HEAD
        if self._limits.header_timeout:
            self.deadline = self._loop.time() + self._limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_target:
            raise _Reject(
                RouterError(
                    414, f"The request target is longer than {self._limits.max_target} bytes", code="uri_too_long"
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_bytes or len(self._headers) >= self._limits.max_headers:
            raise _Reject(
                RouterError(
                    431,
                    f"The request headers are larger than the limit ({self._limits.max_headers} headers, "
                    f"{self._limits.max_header_bytes} bytes)",
                    code="headers_too_large",
                )
            )
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit():
            n = int(length)
            if n > self._max_body:
                raise _Reject(too_large(self._max_body))
            if n and not self._budget.take(n):  # the whole declared body, before any of it is read
                raise _Reject(over_budget())
            self._charged = n
        self._reading = _BODY
        if self.phase != _BUSY:
            self.phase = _BODY
        if self._limits.body_timeout:
            self.deadline = self._loop.time() + self._limits.body_timeout
        if self._headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        n = len(body)
        self._size += n
        if self._size > self._max_body:
            raise _Reject(too_large(self._max_body))
        if self._size > self._charged:  # chunked (or a lying length): charge as it grows
            extra = self._size - self._charged
            if not self._budget.take(extra):
                raise _Reject(over_budget())
            self._charged += extra
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = self._url
        q = url.find(b"?")
        path, query = (url, b"") if q < 0 else (url[:q], url[q + 1 :])
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        charged, self._charged = self._charged, 0
        self._reading = _IDLE
        request = Request(
            self._parser.get_method(), path, query, self._headers, body, self._parser.should_keep_alive(), charged
        )
        if self._task is None or self._task.done():
            self._start(request)
        else:
            self._pending.append(request)
            if self.transport is not None:
                self.transport.pause_reading()

    # -- running requests

    def _start(self, request: Request) -> None:
        self._keep_alive = request.keep_alive
        self._responded = False
        self._streaming = False
        self.phase = _BUSY
        self._task = task = self._loop.create_task(self._run(request))
        if request.charged:  # a done callback runs even for a task cancelled before it started
            task.add_done_callback(functools.partial(_give_back, self._budget, request.charged))

    def _idle(self) -> None:
        """Nothing to run: the connection waits for the next request (or the rest of one)."""
        if self._reading:
            self.phase = self._reading  # its deadline was set when its first byte came
        else:
            self.phase = _IDLE
            if self._limits.idle_timeout:
                self.deadline = self._loop.time() + self._limits.idle_timeout

    async def _run(self, request: Request) -> None:
        try:
            await self._handler.handle(request, self)
        except asyncio.CancelledError:
            if not self.closed:
                raise
            return
        except Exception:
            log.exception("unhandled error in request handler")
            if not self._responded:
                err = RouterError(500, "internal router error", code="internal_error")
                self.send(err.status, err.body(), headers=err.headers)
            else:
                self._keep_alive = False
        if self.closed:
            return
        if self._streaming:  # the handler left a stream open: it cannot be completed any more
            self._keep_alive = False
        if not self._keep_alive:
            assert self.transport is not None
            self.transport.close()
            return
        if self._pending:
            self._start(self._pending.popleft())
            if not self._pending and self.transport is not None:
                self.transport.resume_reading()
        else:
            self._idle()

    def _refuse(self, error: RouterError) -> None:
        """Answer a request that failed parsing, then close (the stream position is unknown)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self._task is None or self._task.done():
            self._keep_alive = False
            self.send(error.status, error.body(), headers=error.headers)
        self.transport.close()

    # -- writing responses

    @property
    def busy(self) -> bool:
        """A request is being handled (or waits behind one)."""
        return (self._task is not None and not self._task.done()) or bool(self._pending)

    @property
    def responded(self) -> bool:
        return self._responded

    @property
    def streaming(self) -> bool:
        """A chunked response is open (started, not finished)."""
        return self._streaming and not self.closed

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Headers = (),
    ) -> None:
        """A whole response with a Content-Length."""
        if self.closed or self.transport is None:
            return
        self._responded = True
        head = [
            status_line(status),
            b"content-type: ",
            content_type.encode("latin-1"),
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        if headers:
            head.append(encode_headers(headers))
        if not self._keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        head.append(body)
        self._write(b"".join(head))

    def start(self, status: int, headers: bytes, content_length: int | None = None) -> None:
        """Begin a response whose body follows: fixed length if known, else chunked. `headers` is encoded."""
        if self.closed or self.transport is None:
            return
        self._responded = True
        if content_length is None:
            self._streaming = True
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b"content-length: " + str(content_length).encode() + b"\r\n"
        close = b"" if self._keep_alive else b"connection: close\r\n"
        self._write(status_line(status) + headers + framing + close + b"\r\n")

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or not data:
            return
        if self._streaming:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def finish(self) -> None:
        if self.closed or self.transport is None:
            return
        if self._streaming:
            self._streaming = False
            self._write(b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes until `uncork`: what one upstream read produces goes out in one send."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        parts, self._corked = self._corked, None
        if parts and self.transport is not None and not self.closed:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def abort(self) -> None:
        """Drop the connection (a response cut short must not look complete)."""
        self._corked = None
        self._keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    async def drain(self) -> None:
        if not self._can_write.is_set():
            await self._can_write.wait()


class _Refused(asyncio.Protocol):
    """A connection over the cap: told so at once (503), then closed, without reading anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        err = unavailable(
            "The router has as many connections as it accepts; retry shortly", code="router_busy", retry_after=1
        )
        body = err.body()
        head = status_line(503) + b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode()
        cast(asyncio.Transport, transport).write(head + b"\r\nretry-after: 1\r\nconnection: close\r\n\r\n" + body)
        cast(asyncio.Transport, transport).close()


class Server:
    """Listens, makes a Connection per client (up to `limits.max_connections`), and enforces deadlines."""

    def __init__(self, handler: Handler, limits: Limits | int | None = None, budget: BodyBudget | None = None) -> None:
        self._handler = handler
        if isinstance(limits, int):  # a bare body limit (older callers)
            limits = Limits(max_body=limits)
        self.limits = limits or Limits()
        self.budget = budget if budget is not None else BodyBudget(0)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.connections: set[Connection] = set()
        self.refused = 0

    def _make(self) -> asyncio.Protocol:
        if self.limits.max_connections and len(self.connections) >= self.limits.max_connections:
            self.refused += 1
            return _Refused()
        conn = Connection(self._handler, self.limits, self.budget, self.connections.discard)
        self.connections.add(conn)
        return conn

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make, host, port, backlog=backlog, reuse_address=True)
        self._sweeper = loop.create_task(self._sweep())
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.limits.tick()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for conn in list(self.connections):
                if conn.phase != _BUSY and conn.deadline and conn.deadline <= now:
                    conn.expire(now)

    async def close(self, grace: float = 0.0, on_grace_end: Callable[[], object] | None = None) -> None:
        """Stop accepting; let requests in progress finish for up to `grace` seconds; then `on_grace_end()`
        (the gateway refuses what it still holds) and a second for those answers to go out; then close."""
        if self._server is None:
            return
        self._server.close()
        for _ in range(int(grace / 0.05)):
            if not any(conn.busy for conn in self.connections):
                break
            await asyncio.sleep(0.05)
        if on_grace_end is not None and on_grace_end():
            for _ in range(20):
                await asyncio.sleep(0.05)
                if not any(conn.busy and not conn.responded for conn in self.connections):
                    break
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self._server.wait_closed()
