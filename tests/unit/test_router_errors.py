"""Every error the router answers itself has an OpenAI-style body: {"error": {message, type, param, code}}."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from loraserve.router.errors import RouterError, error_body
from loraserve.router.gateway import RouterConfig
from loraserve.router.topology import SCALE_FROM_ZERO_TIMEOUT_ANNOTATION
from tests.router.fakes import FakeBackend
from tests.router.harness import NS, Harness, deployment, start_router


def test_error_body_shape() -> None:
    err = RouterError(404, "no such model", param="model", code="model_not_found")
    assert json.loads(err.body()) == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert json.loads(error_body("m", "server_error")) == {
        "error": {"message": "m", "type": "server_error", "param": None, "code": None}
    }


@pytest.fixture
async def harness() -> AsyncIterator[tuple[Harness, FakeBackend]]:
    backend = FakeBackend()
    await backend.start()
    h = await start_router(config=RouterConfig(max_body_bytes=1024))
    h.set(
        [deployment("d"), deployment("zero", annotations={SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "10ms"})],
        replicas={(NS, "d"): [backend.url]},
    )
    yield h, backend
    await h.close()
    await backend.stop()


async def call(h: Harness, method: str, path: str, data: bytes | None = None, **kw: object) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        resp = await s.request(method, h.url + path, data=data, **kw)  # type: ignore[arg-type]
        await resp.read()
        return resp


def check(resp: aiohttp.ClientResponse, status: int, code: str | None, type_: str = "invalid_request_error") -> None:
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = json.loads(resp._body or b"")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_bad_bodies(harness: tuple[Harness, FakeBackend]) -> None:
    h, _ = harness
    check(await call(h, "POST", "/v1/completions", b"{not json"), 400, "invalid_request")
    check(await call(h, "POST", "/v1/completions", b"[1, 2]"), 400, "invalid_request")
    check(await call(h, "POST", "/v1/completions", b'{"prompt": "x"}'), 400, "missing_model")
    check(await call(h, "POST", "/v1/completions", b'{"model": 3}'), 400, "missing_model")
    check(await call(h, "POST", "/v1/completions", b'{"model": "a#b#c"}'), 400, "invalid_request")
    check(await call(h, "POST", "/v1/completions", b'{"model": "m", "deployedModel": 5}'), 400, "invalid_request")


async def test_unknown_model_deployment_route_method(harness: tuple[Harness, FakeBackend]) -> None:
    h, _ = harness
    check(await call(h, "POST", "/v1/completions", b'{"model": "tiny-llama#nope"}'), 404, "deployment_not_found")
    check(await call(h, "POST", "/v1/completions", b'{"model": "nope#d"}'), 404, "model_not_found")
    check(await call(h, "POST", "/v1/embeddings", b"{}"), 404, "not_found")
    resp = await call(h, "GET", "/v1/completions")
    check(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST"


async def test_too_large(harness: tuple[Harness, FakeBackend]) -> None:
    h, backend = harness
    big = json.dumps({"model": "tiny-llama#d", "prompt": "x" * 2000}).encode()
    check(await call(h, "POST", "/v1/completions", big), 413, "request_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 200

    check(await call(h, "POST", "/v1/completions", chunks()), 413, "request_too_large")  # type: ignore[arg-type]
    assert backend.seen == []
    # The router still serves after refusing.
    ok = await call(h, "POST", "/v1/completions", b'{"model": "tiny-llama#d", "prompt": "x"}')
    assert ok.status == 200


async def test_hold_timeout_is_503_with_retry_after(harness: tuple[Harness, FakeBackend]) -> None:
    h, _ = harness
    resp = await call(h, "POST", "/v1/completions", b'{"model": "tiny-llama#zero", "prompt": "x"}')
    check(resp, 503, "scale_from_zero_timeout", "server_error")
    assert int(resp.headers["Retry-After"]) > 0
    assert h.gateway.holds.count() == 0


async def test_unreachable_replica_is_502(harness: tuple[Harness, FakeBackend]) -> None:
    h, backend = harness
    await backend.stop()  # its port now refuses connections
    resp = await call(h, "POST", "/v1/completions", b'{"model": "tiny-llama#d", "prompt": "x"}')
    check(resp, 502, "upstream_unavailable", "server_error")


async def test_upstream_errors_pass_through(harness: tuple[Harness, FakeBackend]) -> None:
    h, backend = harness
    backend.base_model = "something-else"  # the replica now 404s the served name, as vLLM would
    resp = await call(h, "POST", "/v1/completions", b'{"model": "tiny-llama#d", "prompt": "x"}')
    assert resp.status == 404
    assert "does not exist" in json.loads(resp._body or b"")["error"]["message"]


async def test_pipelined_requests_on_one_connection(harness: tuple[Harness, FakeBackend]) -> None:
    h, _ = harness
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    req = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    writer.write(req * 3)
    await writer.drain()
    got = b""
    while got.count(b'{"status":"ok"}') < 3:
        chunk = await reader.read(65536)
        assert chunk
        got += chunk
    writer.write(b"NOT HTTP\r\n\r\n")
    rest = await reader.read()
    assert rest.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_lone_surrogate_escapes_survive_the_rewrite(harness: tuple[Harness, FakeBackend]) -> None:
    h, backend = harness
    resp = await call(h, "POST", "/v1/completions", b'{"model": "tiny-llama#d", "prompt": "a\\ud800b \\u00e9"}')
    assert resp.status == 200
    assert backend.seen[-1].body["prompt"] == "a\ud800b \u00e9"
