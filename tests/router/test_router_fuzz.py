"""Fuzzing the router in front of the fake backend: zero crashes, zero 5xx it caused itself, every error
OpenAI-shaped.

Two generators:
- schemathesis drives the published OpenAPI description (docs/router-openapi.json, i.e. `openapi.document()`)
  with schema-valid and schema-violating requests, and checks the answers against it;
- hypothesis drives raw HTTP: malformed JSON, wrong types, bad UTF-8, huge and deep bodies, broken `#` model
  names, junk request heads, and slow and half-closed clients.

The router and the backend run on an event loop in a background thread; the tests talk to them over real
sockets. Examples per test: `LORASERVE_FUZZ_EXAMPLES` (default 100, about a minute for the file); the
counts are printed at the end (`pytest -s`) and written as JSON to `LORASERVE_FUZZ_REPORT` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from loraserve.router import openapi
from loraserve.router.gateway import RouterConfig
from loraserve.router.httpserver import BodyBudget, Limits
from tests.router.fakes import FakeBackend
from tests.router.harness import NS, Harness, addon, deployment, model_version, start_router

EXAMPLES = int(os.environ.get("LORASERVE_FUZZ_EXAMPLES", "100"))
KEY = "sk-fuzz"
MAX_BODY = 256 * 1024
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@dataclass
class Tally:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_test: Counter[str] = field(default_factory=Counter)
    closed_without_answer: int = 0

    def report(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_test": dict(self.by_test),
            "closed_without_answer": self.closed_without_answer,
            "server_errors": sum(v for k, v in self.by_status.items() if k >= 500 and k != 503),
        }


TALLY = Tally()


@dataclass
class Live:
    harness: Harness
    backend: FakeBackend
    loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return self.harness.port

    def call(self, fn: Any) -> Any:
        """Run `fn()` on the router's loop (its state is not thread-safe) and return the result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    ready: dict[str, Any] = {}
    started = threading.Event()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        backend = FakeBackend(adapters={"bot-v1", "bot-v2"})
        await backend.start()
        harness = await start_router(
            keys=[{"name": "fuzz", "key": KEY}, {"name": "narrow", "key": "sk-narrow", "namespaces": ["other"]}],
            config=RouterConfig(max_body_bytes=MAX_BODY, max_json_depth=64),
            limits=Limits(max_body=MAX_BODY, max_target=2048, max_header_bytes=8192, header_timeout=5.0),
            budget=BodyBudget(64 * MAX_BODY),
        )
        harness.set(
            [
                deployment("d"),
                deployment("merged", model_version="bot-v2"),
                addon("bot", "d", [("bot-v1", 50), ("bot-v2", 50)]),
                model_version("bot-v1", "v1"),
                model_version("bot-v2", "v2"),
            ],
            replicas={(NS, "d"): [backend.url], (NS, "merged"): [backend.url]},
            loaded={backend.url: {"bot-v1", "bot-v2"}},
        )
        done = asyncio.Event()
        stop.append(done)
        ready["live"] = Live(harness, backend, asyncio.get_running_loop())
        started.set()
        await done.wait()
        await harness.close()
        await backend.stop()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert started.wait(30)
    lv: Live = ready["live"]
    yield lv
    lv.loop.call_soon_threadsafe(stop[0].set)
    thread.join(30)
    report = TALLY.report()
    print("\nrouter fuzz:", json.dumps(report))
    if path := os.environ.get("LORASERVE_FUZZ_REPORT"):
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


# -- checking one answer


def read_answer(sock: socket.socket, limit: float = 30.0) -> bytes:
    sock.settimeout(limit)
    parts = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        parts.append(data)
    return b"".join(parts)


def dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


def check(raw: bytes, test: str, *, may_close: bool = False) -> int:
    """The router's answer: a status; a 4xx/5xx body in OpenAI's error shape; no 5xx of its own making."""
    TALLY.requests += 1
    TALLY.by_test[test] += 1
    if not raw:
        assert may_close, "the router closed the connection without an answer"
        TALLY.closed_without_answer += 1
        return 0
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    TALLY.by_status[status] += 1
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    assert status < 500 or status == 503, f"router answered {status}: {body[:300]!r}"
    if status >= 400:
        doc = json.loads(body)
        assert set(doc) == {"error"}, doc
        assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
        assert isinstance(doc["error"]["message"], str)
        assert "127.0.0.1" not in body.decode("utf-8", "replace")  # no replica address, ever
        if status == 503:
            assert "retry-after" in headers
    return status


def send(port: int, data: bytes, test: str, *, may_close: bool = False) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused mid-upload: answer is there
            sock.sendall(data)
        return check(read_answer(sock), test, may_close=may_close)


def post(body: bytes, *, path: str = "/v1/chat/completions", auth: str = f"Bearer {KEY}", extra: bytes = b"") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"authorization: {auth}\r\ncontent-length: {len(body)}\r\n"
    ).encode("latin-1")
    return head + extra + b"\r\n" + body


def assert_healthy(lv: Live) -> None:
    """After a burst of abuse: still answering, nothing held, no connection left behind."""
    assert send(lv.port, b"GET /health HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n", "health") == 200
    server = lv.harness.server
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (lv.call(lambda: server.budget.used) or lv.call(lambda: server.connections)):
        time.sleep(0.02)
    assert lv.call(lambda: server.budget.used) == 0
    assert not lv.call(lambda: set(server.connections))


# -- schemathesis: the OpenAPI description

SCHEMA = schemathesis.openapi.from_dict(openapi.document())
SCHEMA.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], max_examples=EXAMPLES
)


@pytest.fixture
def base_url(live: Live) -> str:
    return f"http://127.0.0.1:{live.port}"


@SCHEMA.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_schema(case: Any, base_url: str) -> None:
    response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    TALLY.requests += 1
    TALLY.by_test["schemathesis " + case.operation.label] += 1
    TALLY.by_status[response.status_code] += 1
    assert response.status_code < 500 or response.status_code == 503, response.content[:300]
    if response.status_code >= 400:
        doc = json.loads(response.content)
        assert set(doc["error"]) == {"message", "type", "param", "code"}
    # Not checked: that every schema-valid request is accepted. Which names exist, and the grammar of
    # "<model>#<deployment>", are beyond JSON Schema: a well-typed request naming an unknown or malformed
    # model is a 400/404 by design.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


# -- hypothesis: raw HTTP

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
name_parts = st.sampled_from(
    ["", "#", "##", "d", "bot", "bot-v1", "tiny-llama", "merged", "accounts/", "default", "/models/", "/deployments/"]
)
model_names = st.lists(name_parts | st.text(max_size=6), min_size=1, max_size=6).map("".join)


@FUZZ
@given(st.binary(max_size=2048))
def test_malformed_bodies(live: Live, body: bytes) -> None:
    send(live.port, post(body), "malformed body")


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "model": model_names | json_values,
            "messages": json_values,
            "prompt": json_values,
            "stream": json_values,
            "stream_options": json_values,
            "user": json_values,
            "deployedModel": model_names | json_values,
            "max_tokens": json_values,
        },
    ),
    st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
)
def test_wrong_types_and_broken_names(live: Live, body: dict[str, Any], path: str) -> None:
    send(live.port, post(json.dumps(body).encode(), path=path), "wrong types")


@FUZZ
@given(model_names, st.binary(min_size=1, max_size=64))
def test_bad_utf8_in_strings(live: Live, model: str, junk: bytes) -> None:
    body = b'{"model": ' + json.dumps(model).encode() + b', "messages": [{"role": "user", "content": "' + junk + b'"}]}'
    send(live.port, post(body), "bad utf-8")


@FUZZ
@given(st.integers(min_value=1, max_value=20_000), st.sampled_from(["[", '{"a":']), st.booleans())
def test_deep_bodies(live: Live, depth: int, opener: str, close: bool) -> None:
    closer = "]" if opener == "[" else "}"
    nest = opener * depth + "1" + (closer * depth if close else "")
    body = ('{"model": "tiny-llama#d", "messages": [{"role": "user", "content": "x"}], "x": ' + nest + "}").encode()
    status = send(live.port, post(body), "deep body")
    if depth > 64 and close and len(body) <= MAX_BODY:
        assert status == 400


@FUZZ
@given(st.integers(min_value=MAX_BODY - 64, max_value=4 * MAX_BODY), st.booleans())
def test_huge_bodies(live: Live, size: int, chunked: bool) -> None:
    pad = b'{"model": "tiny-llama#d", "prompt": "' + b"x" * size + b'"}'
    if chunked:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nhost: r\r\nconnection: close\r\n"
            b"authorization: Bearer " + KEY.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        data = head + b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in _pieces(pad, 65536)) + b"0\r\n\r\n"
    else:
        data = post(pad, path="/v1/completions")
    status = send(live.port, data, "huge body")
    assert status == (413 if len(pad) > MAX_BODY else 200)


def _pieces(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]


header_names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-_0123456789"), min_size=1, max_size=20)
header_values = st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@FUZZ
@given(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"BREW", b"G\x00T"]),
    st.sampled_from([b"/v1/chat/completions", b"/v1/completions", b"/v1/models", b"/health", b"/metrics"])
    | st.binary(max_size=3000),
    st.lists(st.tuples(header_names, header_values), max_size=12),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9", b""]),
)
def test_junk_request_heads(
    live: Live, method: bytes, target: bytes, headers: list[tuple[str, bytes]], version: bytes
) -> None:
    lines = [method + b" " + target + b" " + version]
    lines += [n.encode() + b": " + v for n, v in headers if n.lower() not in ("content-length", "transfer-encoding")]
    lines.append(b"connection: close")
    # A head the parser cannot frame may get no answer at all (there is no request to answer): closed.
    send(live.port, b"\r\n".join(lines) + b"\r\n\r\n", "junk head", may_close=True)


@FUZZ
@given(
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
    st.floats(min_value=0.0, max_value=0.05),
    st.sampled_from(["complete", "half-close", "vanish"]),
)
def test_slow_and_half_closed_clients(live: Live, cuts: list[int], pause: float, ending: str) -> None:
    """A request dribbled in pieces: complete, then answered; or half-closed / dropped part-way: the router
    must let go of it (connection and budget), within its header deadline at worst."""
    data = post(json.dumps({"model": "tiny-llama#d", "messages": [{"role": "user", "content": "x"}]}).encode())
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        pos = 0
        for cut in cuts:
            if pos >= len(data):
                break
            sock.sendall(data[pos : pos + cut])
            pos += cut
            time.sleep(pause)
        if ending == "complete":
            sock.sendall(data[pos:])
            assert check(read_answer(sock), "slow client") == 200
            return
        TALLY.requests += 1
        TALLY.by_test["slow client " + ending] += 1
        if ending == "half-close":
            sock.shutdown(socket.SHUT_WR)
            rest = read_answer(sock)  # the router closes (or answers what it had whole)
            if rest:
                check(rest, "half-closed client")
    if ending == "vanish" or pos >= len(data):
        return


def test_router_survived(live: Live) -> None:
    """Runs after the fuzzers in this file: the router still answers and holds nothing."""
    assert_healthy(live)
    assert TALLY.requests > 0
    assert TALLY.report()["server_errors"] == 0
