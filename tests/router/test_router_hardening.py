"""What a hostile or broken peer can do to the router, one finding at a time, against the fake backend.

Clients: oversized request lines and headers, slow heads and bodies, idle keep-alive connections, too many
connections, too many bodies at once, JSON that is too deep or not standard. Keys: a rotated key with a
concurrency limit. Replicas: refusing connections, resetting before answering, dying or stalling in the
middle of a stream. And what must never leak: a replica's address in an error body.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from loraserve.autoscale.signals import RouterLoad
from loraserve.router.app import RouterApp
from loraserve.router.auth import parse_keys
from loraserve.router.gateway import Gateway, RouterConfig
from loraserve.router.hold import NullWaker
from loraserve.router.httpserver import BodyBudget, Limits
from loraserve.router.topology import SCALE_FROM_ZERO_TIMEOUT_ANNOTATION, TopologyStore
from tests.router.fakes import STREAM_TEXT, FakeBackend
from tests.router.harness import NS, Harness, deployment, keys_yaml, start_router, wait_until

MODEL = "tiny-llama#d"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def request(body: bytes, *, path: str = "/v1/completions", extra: str = "", close: bool = True) -> bytes:
    conn = "connection: close\r\n" if close else ""
    return (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{conn}{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def exchange(port: int, data: bytes, *, limit: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send `data`, read until the router closes, parse the one answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), limit)
    finally:
        writer.close()
    return parse(raw)


def openai_error(body: bytes) -> dict[str, Any]:
    """The body must be OpenAI's error shape; returns its `error` object."""
    doc = json.loads(body)
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str)
    assert err["message"]
    return dict(err)


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    b = FakeBackend()
    await b.start()
    yield b
    await b.stop()


async def router_for(
    backends: list[str], *, config: RouterConfig | None = None, limits: Limits | None = None, **kw: Any
) -> Harness:
    h = await start_router(config=config, limits=limits, **kw)
    h.set([deployment("d")], replicas={(NS, "d"): backends})
    return h


# -- client limits


async def test_request_target_and_headers_are_bounded(backend: FakeBackend) -> None:
    h = await router_for([backend.url], limits=Limits(max_target=256, max_header_bytes=1024, max_headers=10))
    try:
        body = json.dumps({"model": MODEL, "prompt": "x"}).encode()
        status, _, answer = await exchange(h.port, request(body, path="/v1/completions?" + "a" * 300))
        assert status == 414
        assert openai_error(answer)["code"] == "uri_too_long"
        status, _, answer = await exchange(h.port, request(body, extra=f"x-big: {'b' * 2000}\r\n"))
        assert status == 431
        assert openai_error(answer)["code"] == "headers_too_large"
        many = "".join(f"x-h{i}: 1\r\n" for i in range(20))
        status, _, answer = await exchange(h.port, request(body, extra=many))
        assert status == 431
        status, _, _ = await exchange(h.port, request(body))  # within the limits: served
        assert status == 200
        assert len(backend.seen) == 1
    finally:
        await h.close()


async def test_slow_head_and_slow_body_are_cut_off(backend: FakeBackend) -> None:
    h = await router_for([backend.url], limits=Limits(header_timeout=0.3, body_timeout=0.3))
    try:
        # a head that never ends (slowloris)
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        status, _, answer = parse(await asyncio.wait_for(reader.read(-1), 30))
        writer.close()
        assert status == 408
        assert openai_error(answer)["code"] == "request_timeout"
        # a body shorter than it said
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        status, _, answer = parse(await asyncio.wait_for(reader.read(-1), 30))
        writer.close()
        assert status == 408
        assert "body" in openai_error(answer)["message"]
        assert h.server.budget.used == 0  # what the cut-off body had reserved is back
        assert backend.seen == []
    finally:
        await h.close()


async def test_idle_keep_alive_connection_is_closed(backend: FakeBackend) -> None:
    h = await router_for([backend.url], limits=Limits(idle_timeout=0.3))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        first = await reader.readuntil(b'{"status":"ok"}')
        assert first.startswith(b"HTTP/1.1 200")
        rest = await asyncio.wait_for(reader.read(-1), 30)  # EOF: the router closed it, no answer owed
        assert rest == b""
        writer.close()
        assert not h.server.connections
    finally:
        await h.close()


async def test_connections_over_the_cap_are_refused(backend: FakeBackend) -> None:
    h = await router_for([backend.url], limits=Limits(max_connections=2))
    writers = []
    try:
        for _ in range(2):
            _, w = await asyncio.open_connection("127.0.0.1", h.port)
            writers.append(w)
        await wait_until(lambda: len(h.server.connections) == 2)
        status, headers, answer = await exchange(h.port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert status == 503
        assert headers["retry-after"] == "1"
        assert openai_error(answer)["code"] == "router_busy"
        for w in writers:
            w.close()
        await wait_until(lambda: not h.server.connections)
        status, _, _ = await exchange(h.port, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert status == 200
    finally:
        for w in writers:
            w.close()
        await h.close()


async def test_one_body_budget_across_deployments_held_and_in_flight(backend: FakeBackend) -> None:
    """Held bodies (deployment at zero) and in-flight ones share one budget; past it: 503 + Retry-After."""
    budget = BodyBudget(3000)
    h = await start_router(budget=budget)
    h.set(
        [deployment("d"), deployment("z", annotations={SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "1h"})],
        replicas={(NS, "d"): [backend.url]},
    )
    backend.hold = asyncio.Event()
    pad = "x" * 1000
    try:
        held = asyncio.create_task(
            exchange(h.port, request(json.dumps({"model": "tiny-llama#z", "prompt": pad}).encode()))
        )
        await wait_until(lambda: h.gateway.holds.count())
        flying = asyncio.create_task(exchange(h.port, request(json.dumps({"model": MODEL, "prompt": pad}).encode())))
        await wait_until(lambda: backend.seen)
        assert budget.used > 2000
        status, headers, answer = await exchange(h.port, request(json.dumps({"model": MODEL, "prompt": pad}).encode()))
        assert status == 503
        assert headers["retry-after"]
        assert openai_error(answer)["code"] == "router_busy"
        backend.hold.set()
        assert (await flying)[0] == 200
        status, _, _ = await exchange(h.port, request(json.dumps({"model": MODEL, "prompt": pad}).encode()))
        assert status == 200  # the budget came back
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        await wait_until(lambda: budget.used == 0)
    finally:
        await h.close()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "tiny-llama#d", "prompt": "x", "temperature": NaN}', "invalid_json_number"),
        (b'{"model": "tiny-llama#d", "prompt": "x", "temperature": Infinity}', "invalid_json_number"),
        (b'{"model": "tiny-llama#d", "prompt": "x", "temperature": -Infinity}', "invalid_json_number"),
        (b'{"model": "tiny-llama#d", "prompt": "x", "temperature": 1e999}', "invalid_json_number"),
        (b'{"model": "tiny-llama#d", "prompt": ' + b"[" * 200 + b"]" * 200 + b"}", "json_too_deep"),
        (b'{"model": "tiny-llama#d", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "json_too_deep"),
        (b'{"model": "tiny-llama#d", "prompt": "\xff\xfe"}', "invalid_request"),
        (b'{"model": "tiny-llama#d", "n": ' + b"9" * 5000 + b"}", "invalid_request"),
    ],
    ids=["nan", "inf", "-inf", "1e999", "deep", "very-deep", "bad-utf8", "huge-int"],
)
async def test_json_that_cannot_be_forwarded_is_a_400(backend: FakeBackend, body: bytes, code: str) -> None:
    h = await router_for([backend.url], config=RouterConfig(max_body_bytes=1024 * 1024))
    try:
        status, _, answer = await exchange(h.port, request(body))
        assert status == 400
        assert openai_error(answer)["code"] == code
        assert backend.seen == []
    finally:
        await h.close()


async def collect(stream: Any, into: list[str]) -> None:
    async for chunk in stream:
        into.append(chunk.choices[0].delta.content or "")


# -- keys


async def test_rotated_key_with_a_limit_is_not_refused_forever(backend: FakeBackend) -> None:
    h = await router_for([backend.url], keys=[{"name": "team", "key": "sk-old", "maxConcurrentRequests": 1}])
    assert h.gateway.keys is not None
    backend.hold = asyncio.Event()
    try:
        async with AsyncOpenAI(base_url=h.openai_url, api_key="sk-old", max_retries=0) as old:
            first = asyncio.create_task(old.completions.create(model=MODEL, prompt="x"))
            await wait_until(lambda: backend.seen)
            h.gateway.keys.replace(
                parse_keys(keys_yaml([{"name": "team", "key": "sk-new", "maxConcurrentRequests": 1}]))
            )
            backend.hold.set()
            await first  # finishes under the old key object
        async with AsyncOpenAI(base_url=h.openai_url, api_key="sk-new", max_retries=0) as new:
            for _ in range(3):  # before: 429 concurrency_limit_exceeded, forever
                assert (await new.completions.create(model=MODEL, prompt="x")).choices[0].text
        assert h.gateway.keys.in_flight("team") == 0
    finally:
        await h.close()


# -- replicas


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_refused_replica_is_skipped_and_its_address_never_shown(backend: FakeBackend) -> None:
    dead = dead_url()
    h = await router_for([dead, backend.url])
    try:
        async with AsyncOpenAI(base_url=h.openai_url, api_key="x", max_retries=0) as client:
            for _ in range(6):
                r = await client.completions.create(model=MODEL, prompt="x")
                assert r.choices[0].text == "".join(STREAM_TEXT)
        assert len(backend.seen) == 6
        assert (
            'upstream_retries_total{addon="",deployment="d",namespace="default"}' in h.gateway.metrics.render().decode()
        )
        h.set([deployment("d")], replicas={(NS, "d"): [dead]})
        status, _, answer = await exchange(h.port, request(json.dumps({"model": MODEL, "prompt": "x"}).encode()))
        assert status == 502
        err = openai_error(answer)
        port = dead.rsplit(":", 1)[1]
        assert "127.0.0.1" not in answer.decode()
        assert port not in answer.decode()
        assert "default/d" in err["message"]
    finally:
        await h.close()


async def test_reset_before_the_head_goes_to_another_replica(backend: FakeBackend) -> None:
    flaky = FakeBackend(reset_before_head=100)
    await flaky.start()
    h = await router_for([flaky.url, backend.url])
    try:
        async with AsyncOpenAI(base_url=h.openai_url, api_key="x", max_retries=0) as client:
            # The balancer picks between two idle replicas at random: 24 requests all miss the flaky one with
            # a chance of 2^-24 (with 6, 1 in 64: this test once failed so).
            for _ in range(24):
                r = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
                assert r.choices[0].message.content == "".join(STREAM_TEXT)
        assert len(backend.seen) == 24
        assert flaky.seen  # it did get (and drop) some of them
    finally:
        await h.close()
        await flaky.stop()


async def test_never_retried_once_the_answer_started(backend: FakeBackend) -> None:
    """A replica that dies mid-stream: the client gets the events so far, then an error event; no other
    replica sees the request (it may have been acted on)."""
    dying = FakeBackend(die_after=2, stream_events=STREAM_TEXT)
    await dying.start()
    h = await router_for([dying.url])
    try:
        h.set([deployment("d")], replicas={(NS, "d"): [dying.url, backend.url]})
        # make the dying one the only candidate for the first request
        backend_replica = next(r for _, r in h.store.replicas() if r.url == backend.url)
        backend_replica.in_flight = 1000
        got: list[str] = []
        async with AsyncOpenAI(base_url=h.openai_url, api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError) as err:
                await collect(stream, got)
        assert got == list(STREAM_TEXT[:2])
        assert "broke the response off" in err.value.message
        assert backend.seen == []
        backend_replica.in_flight = 0
    finally:
        await h.close()
        await dying.stop()


async def test_stalled_stream_ends_with_an_error_event(backend: FakeBackend) -> None:
    backend.stall_after = 2
    h = await router_for([backend.url], config=RouterConfig(stream_idle_timeout=1.0))
    try:
        got: list[str] = []
        async with AsyncOpenAI(base_url=h.openai_url, api_key="x", max_retries=0, timeout=60) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError) as err:
                await collect(stream, got)
            assert got == list(STREAM_TEXT[:2])
            assert "sent nothing for 1s" in err.value.message
            # the connection to the router is still good: the stream was ended properly
            backend.stall_after = None
            r = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert r.choices[0].message.content == "".join(STREAM_TEXT)
        await wait_until(lambda: backend.disconnects)  # the stalled request was cancelled on the replica
        metrics = h.gateway.metrics.render().decode()
        assert 'code="504",deployment="d"' in metrics
    finally:
        await h.close()


async def test_no_response_head_in_time_is_a_504_without_address(backend: FakeBackend) -> None:
    backend.hold = asyncio.Event()
    h = await router_for([backend.url], config=RouterConfig(head_timeout=0.3))
    try:
        status, _, answer = await exchange(h.port, request(json.dumps({"model": MODEL, "prompt": "x"}).encode()))
        assert status == 504
        assert openai_error(answer)["code"] == "upstream_timeout"
        assert str(backend.port) not in answer.decode()
    finally:
        backend.hold.set()
        await h.close()


# -- metrics port


async def test_metrics_on_a_port_of_their_own(backend: FakeBackend) -> None:
    store = TopologyStore()
    gateway = Gateway(store, NullWaker(), config=RouterConfig(serve_metrics=False))
    app = RouterApp(gateway=gateway, metrics_port=0)
    port = await app.start()
    try:
        assert app.metrics_port
        status, _, answer = await exchange(app.metrics_port, b"GET /metrics HTTP/1.1\r\nconnection: close\r\n\r\n")
        assert status == 200
        assert b"loraserve_router_requests_in_flight" in answer
        status, _, answer = await exchange(app.metrics_port, b"GET /load HTTP/1.1\r\nconnection: close\r\n\r\n")
        assert status == 200
        assert RouterLoad.model_validate_json(answer).format == 1  # the operator's feed goes with the metrics
        for path in (b"/metrics", b"/load"):
            status, _, answer = await exchange(port, b"GET " + path + b" HTTP/1.1\r\nconnection: close\r\n\r\n")
            assert status == 404
            openai_error(answer)
        status, _, answer = await exchange(app.metrics_port, b"GET /v1/models HTTP/1.1\r\nconnection: close\r\n\r\n")
        assert status == 404  # nothing but metrics there
        openai_error(answer)
    finally:
        await app.stop()


# -- shutdown


async def test_held_requests_are_refused_cleanly_at_shutdown() -> None:
    store = TopologyStore()
    gateway = Gateway(store, NullWaker())
    app = RouterApp(gateway=gateway)
    port = await app.start()
    h = Harness(store, gateway, app.server, port)  # type: ignore[arg-type]
    h.set([deployment("z", annotations={SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "1h"})])
    body = json.dumps({"model": "tiny-llama#z", "prompt": "x"}).encode()
    clients = [asyncio.create_task(exchange(port, request(body))) for _ in range(4)]
    await wait_until(lambda: gateway.holds.count() == 4)
    await app.stop(grace=0.2)
    for status, headers, answer in await asyncio.gather(*clients):
        assert status == 503
        assert headers["retry-after"] == "1"
        assert openai_error(answer)["code"] == "router_restarting"


async def test_pooled_connection_the_replica_dropped_is_retried_fresh() -> None:
    """A keep-alive connection the replica closes as the next request arrives (its idle timer fired): that
    request received nothing, so it goes again on a new connection, even with a single replica."""
    answer = json.dumps({"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}).encode()
    served = 0

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        for n in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if n == 1:  # the second request on a connection: dropped unanswered
                writer.transport.abort()
                return
            served += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                % (len(answer), answer)
            )
            await writer.drain()

    server = await asyncio.start_server(replica, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    h = await router_for([url])
    try:
        for _ in range(3):
            status, _, body = await exchange(h.port, request(json.dumps({"model": MODEL, "prompt": "x"}).encode()))
            assert status == 200
            assert json.loads(body)["choices"][0]["text"] == "ok"
        assert served == 3
    finally:
        await h.close()
        server.close()
