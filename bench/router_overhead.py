"""Router overhead on loopback: added latency (router minus direct) and peak throughput, in one run.

    .venv/bin/python bench/router_overhead.py [--requests 2000] [--seconds 3] [--concurrency 16]
        [--install-references] [--vllm-router BIN] [--production-stack-router BIN]

Starts, each in its own process on 127.0.0.1: a fast fake OpenAI backend (uvloop + raw protocol; a chat
completion answered with a fixed 4-event SSE stream), then measures the same load sent
  - directly to the backend,
  - through loraserve's router (uvloop, and on the plain asyncio loop),
  - through a minimal aiohttp pass-through proxy (what the router would cost on aiohttp: the stack choice),
  - through the reference routers when they are installed: PyPI `vllm-router` (Rust) and the vLLM
    production-stack router (Python, FastAPI). `--install-references` makes a virtualenv for each under the
    system temp dir and pip-installs them there (the production stack from a source checkout given with
    `--production-stack-src`, since its PyPI name now belongs to the Rust router).
Latency: one connection, `--requests` sequential requests (after a warm-up), p50 / p99 of the full response
(through `data: [DONE]`). Throughput: `--concurrency` keep-alive connections for `--seconds`, completed
responses per second. Long streams: 256-token SSE chat streams (one event per token, each its own write,
as a generating server sends them), on one connection and on `--concurrency`, streamed tokens per second.
Rounds alternate between targets and the median round counts, because the machine is shared. All traffic
stays on 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
BASE = "tiny-llama"
DEPLOYMENT = "bench"

# ----------------------------------------------------------------------------------------------------------
# The fake backend: raw asyncio protocol, fixed answers, as fast as Python gets.


def _sse() -> bytes:
    events = []
    for i, piece in enumerate(("Hello", " from", " the", " fake")):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": BASE,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    body = b"".join(events)
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    )


def _json_response(payload: Any, status: str = "200 OK") -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        status.encode(),
        len(body),
        body,
    )


STREAM_RESPONSE = _sse()
LONG_TOKENS = 256  # a long answer: one SSE event per token, each its own chunk and its own write


def _long_events() -> list[bytes]:
    out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"]
    for i in range(LONG_TOKENS):
        delta = {"role": "assistant", "content": "tok"} if i == 0 else {"content": " tok"}
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": BASE,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        event = b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        out.append(b"%x\r\n%b\r\n" % (len(event), event))
    out.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    return out


LONG_EVENTS = _long_events()
MODELS_RESPONSE = _json_response(
    {"object": "list", "data": [{"id": BASE, "object": "model", "root": BASE, "parent": None, "owned_by": "vllm"}]}
)
HEALTH_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
NOT_FOUND = _json_response({"error": {"message": "not found"}}, "404 Not Found")


def serve_backend(port: int) -> None:
    import httptools

    class Backend(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.long = False
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                assert self.transport is not None
                self.transport.close()

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            if b'"max_tokens":%d' % LONG_TOKENS in body:
                self.long = True

        def on_message_complete(self) -> None:
            path, self.url = self.url.split(b"?")[0], b""
            assert self.transport is not None
            if self.long:
                self.long = False
                asyncio.get_running_loop().create_task(self.stream(self.transport))
            elif path.endswith(b"/completions"):
                self.transport.write(STREAM_RESPONSE)
            elif path == b"/v1/models":
                self.transport.write(MODELS_RESPONSE)
            elif path in (b"/health", b"/healthz", b"/readiness", b"/liveness"):
                self.transport.write(HEALTH_RESPONSE)
            else:
                self.transport.write(NOT_FOUND)
            if not self.parser.should_keep_alive():
                self.transport.close()

        async def stream(self, transport: asyncio.Transport) -> None:
            # Token by token, yielding to the loop between events, as a generating server does.
            for event in LONG_EVENTS:
                if transport.is_closing():
                    return
                transport.write(event)
                await asyncio.sleep(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Backend, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    _run(main())


# ----------------------------------------------------------------------------------------------------------
# A minimal aiohttp pass-through proxy: the floor of what a router built on aiohttp costs.


def serve_aiohttp_proxy(port: int, upstream: str) -> None:
    import aiohttp
    from aiohttp import web

    async def main() -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))

        async def proxy(request: web.Request) -> web.StreamResponse:
            body = json.loads(await request.read())
            body["model"] = BASE
            async with session.post(upstream + request.path, json=body) as up:
                resp = web.StreamResponse(status=up.status, headers={"content-type": up.content_type})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        async def health(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", proxy)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await session.close()
        await runner.cleanup()

    _run(main())


def _run(coro: Any) -> None:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


# ----------------------------------------------------------------------------------------------------------
# The load generator: raw keep-alive HTTP/1.1 client connections.


class ClientConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._check()

    def _check(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        if b"transfer-encoding: chunked" in head:
            if buf.endswith(b"0\r\n\r\n"):
                self.buf = bytearray()
                self.waiter.set_result(status)
            return
        i = head.find(b"content-length:")
        length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
        if len(buf) >= end + 4 + length:
            self.buf = bytearray()
            self.waiter.set_result(status)

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def request_bytes(port: int, model: str, max_tokens: int = 8) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello"}],
            "stream": True,
            "max_tokens": max_tokens,
        },
        separators=(",", ":"),
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer bench\r\ncontent-length: %d\r\n\r\n%b" % (port, len(body), body)
    )


async def _connect(port: int) -> ClientConn:
    _, conn = await asyncio.get_running_loop().create_connection(ClientConn, "127.0.0.1", port)
    return conn


async def latency(port: int, model: str, n: int, warmup: int) -> list[float]:
    data = request_bytes(port, model)
    conn = await _connect(port)
    out: list[float] = []
    for i in range(warmup + n):
        t = time.perf_counter()
        status = await conn.request(data)
        dt = time.perf_counter() - t
        if status != 200:
            raise RuntimeError(f"status {status}")
        if i >= warmup:
            out.append(dt)
    assert conn.transport is not None
    conn.transport.close()
    return out


async def throughput(port: int, model: str, concurrency: int, seconds: float, max_tokens: int = 8) -> float:
    data = request_bytes(port, model, max_tokens)
    conns = [await _connect(port) for _ in range(concurrency)]
    done = 0
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(conn: ClientConn) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            if await conn.request(data) == 200:
                done += 1
            else:
                errors += 1

    for conn in conns:  # warm every connection once
        await conn.request(data)
    t = time.perf_counter()
    deadline = t + seconds
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - t
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    if errors:
        raise RuntimeError(f"{errors} non-200 answers")
    return done / elapsed


async def stream_rate(port: int, model: str, concurrency: int, seconds: float) -> float:
    """Streamed tokens per second: `concurrency` connections each receiving 256-token SSE streams."""
    return LONG_TOKENS * await throughput(port, model, concurrency, seconds, LONG_TOKENS)


# ----------------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    port: int
    model: str
    proc: subprocess.Popen[bytes] | None = None
    lat: list[list[float]] = field(default_factory=list)
    tput: list[float] = field(default_factory=list)
    tok1: list[float] = field(default_factory=list)  # streamed tokens/s, one connection
    tokn: list[float] = field(default_factory=list)  # streamed tokens/s, --concurrency connections
    error: str = ""


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes] | None, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    req = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(req)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no 200 from :{port}{path} within {limit:.0f}s")


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def reference_dir() -> Path:
    return Path(tempfile.gettempdir()) / "loraserve-bench-references"


def install_references(src: Path | None) -> None:
    base = reference_dir()
    base.mkdir(parents=True, exist_ok=True)
    for name, spec, extra in (
        ("vllm-router", ["vllm-router"], []),
        ("production-stack", [str(src)] if src else [], ["--ignore-requires-python"]),
    ):
        venv = base / name
        if not spec or (venv / "bin" / "vllm-router").exists():
            continue
        print(f"installing {name} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = {**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": "0.0.0"}
        res = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", *extra, *spec], env=env, capture_output=True, text=True
        )
        if res.returncode != 0:
            print(f"  {name}: pip failed:\n{res.stderr[-2000:]}", flush=True)


def find_reference(explicit: str | None, name: str) -> str | None:
    if explicit:
        return explicit
    candidate = reference_dir() / name / "bin" / "vllm-router"
    return str(candidate) if candidate.exists() else None


@contextlib.contextmanager
def targets(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[list[Target], subprocess.Popen[bytes]]]:
    py = sys.executable
    me = str(Path(__file__).resolve())
    backend_port = free_port()
    backend = spawn([py, me, "--serve-backend", str(backend_port)], workdir / "backend.log")
    started: list[Target] = []
    try:
        wait_http(backend_port, "/health", backend)
        upstream = f"http://127.0.0.1:{backend_port}"
        topo = workdir / "topology.yaml"
        topo.write_text(
            json.dumps(
                {
                    "resources": [
                        {
                            "apiVersion": "serving.loraserve.dev/v1alpha1",
                            "kind": "Deployment",
                            "metadata": {"name": DEPLOYMENT, "namespace": "default"},
                            "spec": {"baseModel": f"file:///models/{BASE}", "enableAddons": True},
                        }
                    ],
                    "replicas": {f"default/{DEPLOYMENT}": [upstream]},
                }
            )
        )
        keys = workdir / "keys.yaml"
        keys.write_text(json.dumps([{"name": "bench", "sha256": hashlib.sha256(b"bench").hexdigest()}]))
        specs: list[tuple[str, list[str] | None, str, str]] = [("direct", None, BASE, "")]
        for loop in ("uvloop", "asyncio"):
            specs.append(
                (
                    f"loraserve ({loop})",
                    [
                        py,
                        "-m",
                        "loraserve.router",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "--static-topology",
                        str(topo),
                        "--api-keys-file",
                        str(keys),
                        "--loop",
                        loop,
                        "--log-level",
                        "WARNING",
                    ],
                    f"{BASE}#{DEPLOYMENT}",
                    "",
                )
            )
        specs.append(("aiohttp pass-through", [py, me, "--serve-aiohttp-proxy", "{port}", upstream], BASE, ""))
        vr = find_reference(args.vllm_router, "vllm-router")
        if vr:
            specs.append(
                (
                    "vllm-router (Rust)",
                    [
                        vr,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "--worker-urls",
                        upstream,
                        "--policy",
                        "round_robin",
                        "--log-level",
                        "warning",
                        "--prometheus-port",
                        "{port2}",
                    ],
                    BASE,
                    "",
                )
            )
        else:
            print("vllm-router (Rust): not installed (use --install-references or --vllm-router BIN)")
        ps = find_reference(args.production_stack_router, "production-stack")
        if ps:
            specs.append(
                (
                    "production-stack router",
                    [
                        ps,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "--service-discovery",
                        "static",
                        "--static-backends",
                        upstream,
                        "--static-models",
                        BASE,
                        "--routing-logic",
                        "roundrobin",
                        "--log-level",
                        "warning",
                        "--engine-stats-interval",
                        "3600",
                    ],
                    BASE,
                    "",
                )
            )
        else:
            print("production-stack router: not installed (use --install-references with --production-stack-src)")
        if args.only:
            wanted = [w.strip().lower() for w in args.only.split(",")]
            specs = [sp for sp in specs if sp[0] == "direct" or any(w in sp[0].lower() for w in wanted)]
        for name, argv, model, _ in specs:
            if argv is None:
                started.append(Target(name, backend_port, model))
                continue
            port, port2 = free_port(), free_port()
            argv = [a.replace("{port}", str(port)).replace("{port2}", str(port2)) for a in argv]
            log = workdir / (name.split()[0] + ("-asyncio" if "asyncio" in name else "") + ".log")
            target = Target(name, port, model, spawn(argv, log))
            try:
                wait_http(port, "/health", target.proc)
                started.append(target)
            except RuntimeError as exc:
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                print(f"{name}: did not start ({exc}); log tail:\n{tail}")
                stop(target.proc)
        yield started, backend
    finally:
        for t in started:
            stop(t.proc)
        stop(backend)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per latency round")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seconds", type=float, default=3.0, help="length of a throughput round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", help="comma-separated substrings of target names to run (direct always runs)")
    p.add_argument("--vllm-router", help="the Rust vllm-router executable")
    p.add_argument("--production-stack-router", help="the production-stack vllm-router executable")
    p.add_argument("--install-references", action="store_true", help="pip-install the references in temp venvs")
    p.add_argument("--production-stack-src", type=Path, help="a production-stack checkout (for --install-references)")
    p.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-aiohttp-proxy", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return 0
    if args.serve_aiohttp_proxy:
        serve_aiohttp_proxy(int(args.serve_aiohttp_proxy[0]), args.serve_aiohttp_proxy[1])
        return 0
    if args.install_references:
        install_references(args.production_stack_src)

    workdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    try:
        with targets(args, workdir) as (started, _):

            async def measure() -> None:
                for rnd in range(args.rounds):
                    for t in started:
                        if t.error:
                            continue
                        try:
                            t.lat.append(await latency(t.port, t.model, args.requests, args.warmup))
                            t.tput.append(await throughput(t.port, t.model, args.concurrency, args.seconds))
                            t.tok1.append(await stream_rate(t.port, t.model, 1, args.seconds))
                            t.tokn.append(await stream_rate(t.port, t.model, args.concurrency, args.seconds))
                        except (RuntimeError, OSError) as exc:
                            t.error = str(exc)
                    print(f"round {rnd + 1}/{args.rounds} done", flush=True)

            _run(measure())
            report(started, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(started: list[Target], args: argparse.Namespace) -> None:
    direct = started[0]

    def med(t: Target, q: float) -> float:
        return statistics.median(pct(r, q) for r in t.lat) * 1000

    def tput(t: Target) -> float:
        return statistics.median(t.tput)

    refs = [t for t in started if not t.error and ("vllm-router" in t.name or "production-stack" in t.name)]
    print()
    print(
        f"Loopback, fake backend with a fixed 4-event SSE chat stream; latency: 1 connection x {args.requests} "
        f"requests; throughput: {args.concurrency} connections x {args.seconds:g}s; long streams: "
        f"{LONG_TOKENS}-token SSE chat streams (one event per token) on 1 and {args.concurrency} connections x "
        f"{args.seconds:g}s, streamed tokens/s; median of {args.rounds} rounds."
    )
    cols = ["target", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "req/s", "x direct"]
    cols += [f"x {r.name.split()[0]}" for r in refs]
    cols += ["tok/s 1 stream", f"tok/s {args.concurrency} streams", "tok/s x direct"]
    cols += [f"tok/s x {r.name.split()[0]}" for r in refs]
    rows = []
    for t in started:
        if t.error:
            rows.append([t.name, f"failed: {t.error}"] + [""] * (len(cols) - 2))
            continue
        row = [
            t.name,
            f"{med(t, 0.5):.3f}",
            f"{med(t, 0.99):.3f}",
            "-" if t is direct else f"{med(t, 0.5) - med(direct, 0.5):+.3f}",
            "-" if t is direct else f"{med(t, 0.99) - med(direct, 0.99):+.3f}",
            f"{tput(t):.0f}",
            f"{tput(t) / tput(direct):.2f}",
        ]
        row += [f"{tput(t) / tput(r):.2f}" for r in refs]
        row += [f"{statistics.median(t.tok1):.0f}", f"{statistics.median(t.tokn):.0f}"]
        row += [f"{statistics.median(t.tokn) / statistics.median(direct.tokn):.2f}"]
        row += [f"{statistics.median(t.tokn) / statistics.median(r.tokn):.2f}" for r in refs]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
