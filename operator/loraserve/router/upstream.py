"""HTTP/1.1 client for the model servers: pooled keep-alive connections, responses streamed to a sink.

The response is parsed in C (httptools) and handed to a `ResponseSink` callback by callback, so a streamed
body goes from the replica's socket to the client's without a task switch per chunk. A connection goes
back to the pool only after a complete response that allows keep-alive; idle ones are dropped after
`idle_timeout` (below uvicorn's 5 s keep-alive, so the replica never closes one under our feet while we
reuse it).
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

RawHeaders = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The replica could not be reached or broke the response off."""


class ConnectError(UpstreamError):
    """No connection could be made: nothing was sent, so another replica may be tried."""


class ResponseSink(Protocol):
    def begin(self) -> None: ...  # before a batch of callbacks from one read
    def end(self) -> None: ...  # after it
    def on_head(self, status: int, headers: RawHeaders) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_complete(self) -> None: ...
    def on_error(self, exc: BaseException) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self._pool = pool
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self._headers: RawHeaders = []
        self.closed = False
        self.idle_since = 0.0
        self.head_seen = False
        self.reused = False  # taken from the pool: the replica may have closed it meanwhile

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.begin()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response from the replica: {exc}"))
        finally:
            if sink is not None:
                sink.end()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        self._fail(UpstreamError(f"the replica closed the connection{': ' + str(exc) if exc else ''}"))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []
        self.head_seen = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_seen = True
        if self.sink is not None:
            self.sink.on_head(self._parser.get_status_code(), self._headers)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_body(body)

    def on_message_complete(self) -> None:
        sink, self.sink = self.sink, None
        self._pool.release(self, self._parser.should_keep_alive())
        if sink is not None:
            sink.on_complete()

    # -- use

    def send(self, data: bytes, sink: ResponseSink) -> None:
        self.sink = sink
        assert self.transport is not None
        self.transport.write(data)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection, e.g. because the client went away: the replica sees the disconnect."""
        self.sink = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        sink, self.sink = self.sink, None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        if sink is not None:
            sink.on_error(exc)


class UpstreamPool:
    def __init__(self, connect_timeout: float = 3.0, idle_timeout: float = 3.0, max_idle_per_host: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()

    async def acquire(self, host: str, port: int, fresh: bool = False) -> UpstreamConnection:
        """An idle pooled connection to host:port, or a new one (always, with `fresh`: the pooled ones
        to this host are dropped, since one just turned out dead). Raises ConnectError."""
        key = (host, port)
        idle = self._idle.get(key)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()
                if not fresh and not conn.closed and now - conn.idle_since < self.idle_timeout:
                    conn.reused = True
                    return conn
                conn.abort()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(lambda: UpstreamConnection(self, key), host, port)
        except TimeoutError:
            raise ConnectError(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        self._all.add(proto)
        return proto

    def release(self, conn: UpstreamConnection, keep_alive: bool) -> None:
        if conn.closed:
            return
        idle = self._idle.setdefault(conn.key, [])
        if not keep_alive or len(idle) >= self.max_idle_per_host:
            conn.abort()
            self._all.discard(conn)
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()


def request_bytes(method: str, host: str, port: int, path: str, body: bytes = b"", extra: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode("latin-1") + extra + b"\r\n" + body


class _Collect:
    def __init__(self) -> None:
        self.status = 0
        self.headers: RawHeaders = []
        self.parts: list[bytes] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    def on_head(self, status: int, headers: RawHeaders) -> None:
        self.status = status
        self.headers = headers

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)

    def on_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def fetch(
    pool: UpstreamPool,
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    time_limit: float = 5.0,
    extra: bytes = b"",
) -> tuple[int, bytes]:
    """A whole small request/response (status, body): the adapter poller uses it."""
    async with asyncio.timeout(time_limit):
        conn = await pool.acquire(host, port)
        sink = _Collect()
        conn.send(request_bytes(method, host, port, path, body, extra), sink)
        try:
            await sink.done
        except BaseException:
            conn.abort()
            raise
    return sink.status, b"".join(sink.parts)
