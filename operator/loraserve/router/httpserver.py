"""A small HTTP/1.1 server on asyncio protocols (httptools' llhttp parser), made for a proxy's hot path.

One `Connection` per client socket. Requests are parsed in C; each complete request runs as one task
through `Handler.handle(request, connection)`; requests pipelined behind it wait (reading is paused).
The handler answers with `send()` (a whole response) or `start()` / `write()` / `finish()` (chunked
transfer, what SSE streams use). A client that goes away cancels the running handler task, which is how a
disconnect reaches the upstream request. Bodies are bounded: a declared length over the limit is refused
before the body is read (413), and so is a chunked body once it grows past it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from loraserve.router.errors import RouterError, too_large

log = logging.getLogger(__name__)

Headers = Iterable[tuple[str, str]]

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in _REASONS.items()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HIGH_WATER = 256 * 1024


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


def encode_headers(headers: Headers) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self, method: bytes, path: bytes, query: bytes, headers: dict[bytes, bytes], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case names; a repeated header keeps its last value
        self.body = body
        self.keep_alive = keep_alive


class Handler(Protocol):
    async def handle(self, request: Request, conn: Connection) -> None: ...


class _Reject(Exception):
    def __init__(self, error: RouterError) -> None:
        super().__init__(error.message)
        self.error = error


class Connection(asyncio.Protocol):
    """One client connection. Not reused across sockets."""

    def __init__(self, handler: Handler, max_body: int, on_close: Callable[[Connection], None] | None = None) -> None:
        self._handler = handler
        self._max_body = max_body
        self._on_close = on_close
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._pending: deque[Request] = deque()
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
        self._pending.clear()
        if self._on_close is not None:
            self._on_close(self)

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
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise _Reject(too_large(self._max_body))
        if self._headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            raise _Reject(too_large(self._max_body))
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = self._url
        q = url.find(b"?")
        path, query = (url, b"") if q < 0 else (url[:q], url[q + 1 :])
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(self._parser.get_method(), path, query, self._headers, body, self._parser.should_keep_alive())
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
        self._task = asyncio.get_running_loop().create_task(self._run(request))

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


class Server:
    """Listens and makes a Connection per client."""

    def __init__(self, handler: Handler, max_body: int) -> None:
        self._handler = handler
        self._max_body = max_body
        self._server: asyncio.Server | None = None
        self.connections: set[Connection] = set()

    def _make(self) -> Connection:
        conn = Connection(self._handler, self._max_body, self.connections.discard)
        self.connections.add(conn)
        return conn

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make, host, port, backlog=backlog, reuse_address=True)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; let requests in progress finish for up to `grace` seconds; then close."""
        if self._server is None:
            return
        self._server.close()
        for _ in range(int(grace / 0.05)):
            if not any(conn.busy for conn in self.connections):
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self._server.wait_closed()
