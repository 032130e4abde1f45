"""Entry point: `python -m loraserve.router --port 8080 [--kubeconfig K | --in-cluster | --static-topology F]
[--api-keys-file F] [--namespace NS ...] [--metrics-port P] [limits and timeouts: see --help]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loraserve.router.auth import KeyRing, KeysFileError, parse_keys
from loraserve.router.discovery import AdapterPoller, KubernetesDiscovery, StaticDiscovery
from loraserve.router.gateway import Gateway, MetricsHandler, RouterConfig
from loraserve.router.hold import NullWaker, Waker
from loraserve.router.httpserver import BodyBudget, Limits, Server
from loraserve.router.kubeapi import KubeClient, load_credentials
from loraserve.router.topology import TopologyStore
from loraserve.router.waker import KubernetesWaker
from loraserve.tokens import ModelServerTokens

log = logging.getLogger("loraserve.router")


class KeysFile:
    """The keys file, re-read when it changes (a mounted Secret is updated in place)."""

    def __init__(self, path: Path, ring: KeyRing, interval: float = 5.0) -> None:
        self.path = path
        self.ring = ring
        self.interval = interval
        self._stamp: tuple[float, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        st = self.path.stat()
        self.ring.replace(parse_keys(self.path.read_text()))
        self._stamp = (st.st_mtime, st.st_ino)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                st = self.path.stat()
                if (st.st_mtime, st.st_ino) != self._stamp:
                    self.load()
                    log.info("reloaded API keys from %s (%d keys)", self.path, len(self.ring))
            except (OSError, KeysFileError) as exc:
                log.error("API keys file %s not reloaded, keeping the previous keys: %s", self.path, exc)


@dataclass
class RouterApp:
    """The whole router, startable in-process (tests) or from `main`."""

    gateway: Gateway
    source: StaticDiscovery | KubernetesDiscovery | None = None
    poller: AdapterPoller | None = None
    keys_file: KeysFile | None = None
    kube: KubeClient | None = None
    limits: Limits | None = None
    budget: BodyBudget | None = None
    metrics_port: int | None = None  # a port of its own for /metrics and /load (0 picks one); None: the API port
    server: Server | None = None
    metrics_server: Server | None = None
    port: int = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        limits = self.limits or Limits(max_body=self.gateway.config.max_body_bytes)
        self.server = Server(self.gateway, limits, self.budget)
        self.port = await self.server.start(host, port)
        if self.metrics_port is not None:
            self.metrics_server = Server(MetricsHandler(self.gateway), Limits(max_body=0, max_connections=256))
            self.metrics_port = await self.metrics_server.start(host, self.metrics_port)
        if isinstance(self.source, StaticDiscovery):
            self.source.load()
        if self.source is not None:
            self.source.start()
        if self.poller is not None:
            self.poller.start()
        if self.keys_file is not None:
            self.keys_file.start()
        return self.port

    async def stop(self, grace: float = 0.0) -> None:
        if self.server is not None:
            # Held requests (deployments at zero) wait out the grace like the rest; then they are answered
            # 503 + Retry-After, never dropped unanswered.
            await self.server.close(grace, on_grace_end=self.gateway.holds.fail_all)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        for part in (self.keys_file, self.source, self.poller):
            if part is not None:
                await part.close()
        await self.gateway.close()
        if self.kube is not None:
            await self.kube.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraserve.router", description="loraserve's OpenAI-compatible router")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks one)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve GET /metrics and /load (the operator's feed) on this port only, not on --port (default: on --port)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--kubeconfig", help="watch the cluster of this kubeconfig")
    src.add_argument("--in-cluster", action="store_true", help="watch the cluster with the pod's service account")
    src.add_argument("--static-topology", type=Path, help="a YAML topology file instead of a cluster")
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="a namespace to serve (repeat, or comma-separate); default: every namespace",
    )
    p.add_argument("--api-keys-file", type=Path, help="YAML list of {name, sha256, namespaces, deployments}")
    p.add_argument(
        "--model-server-key-file",
        help="the install key (the chart's Secret): each Deployment's model-server token is derived from it",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (413 above)")
    d = Limits()
    p.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="memory budget for all request bodies being read, held at zero or forwarded, across deployments "
        "(503 with Retry-After past it; 0: unbounded; default 256 MiB)",
    )
    p.add_argument(
        "--max-request-target-bytes", type=int, default=d.max_target, help="longest request path+query (414 above)"
    )
    p.add_argument(
        "--max-header-bytes", type=int, default=d.max_header_bytes, help="all request headers together (431 above)"
    )
    p.add_argument("--max-headers", type=int, default=d.max_headers, help="request headers at most (431 above)")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help="seconds from a request's first byte to the end of its headers (408 and closed after)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help="seconds from the end of the headers to the end of the body (408 and closed after)",
    )
    p.add_argument(
        "--idle-timeout", type=float, default=d.idle_timeout, help="seconds an idle keep-alive connection is kept"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="client connections at once; one more is answered 503 and closed",
    )
    p.add_argument("--max-json-depth", type=int, default=128, help="deepest nesting of a JSON request body (400 above)")
    p.add_argument(
        "--head-timeout",
        type=float,
        default=900.0,
        help="seconds a replica may take to send its response head (504 after; a non-streamed answer's head "
        "comes when generation ends)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=300.0,
        help="seconds a started response may go without a byte from the replica before it is ended "
        "(an SSE stream with an error event; 0: never)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="other replicas a request is sent to when one received nothing (refused, reset before answering)",
    )
    p.add_argument("--key-concurrency", type=int, default=0, help="requests one API key may have at once (0: no limit)")
    p.add_argument("--adapter-poll-interval", type=float, default=2.0, help="seconds between GET /v1/models polls")
    p.add_argument("--connect-timeout", type=float, default=3.0, help="seconds to connect to a replica")
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=25.0,
        help="seconds requests in progress may take to finish after SIGTERM (default 25)",
    )
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="event loop (auto: uvloop)")
    p.add_argument("--access-log", action="store_true", help="one line per request (never keys or prompts)")
    p.add_argument("--log-level", default="INFO")
    return p


def build_app(args: argparse.Namespace) -> RouterApp:
    namespaces = [n for item in args.namespace for n in item.split(",") if n]
    store = TopologyStore()
    tokens = ModelServerTokens.from_file(args.model_server_key_file)
    if not tokens.enabled:
        log.warning("no --model-server-key-file: model servers are called without a token")
    poller = AdapterPoller(store, interval=args.adapter_poll_interval, tokens=tokens)
    kube: KubeClient | None = None
    source: StaticDiscovery | KubernetesDiscovery
    waker: Waker
    if args.static_topology is not None:
        source = StaticDiscovery(args.static_topology, store, namespaces, poller)
        waker = NullWaker()
    else:
        in_cluster = args.in_cluster or (args.kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ)
        kube = KubeClient(load_credentials(args.kubeconfig, in_cluster=in_cluster))
        source = KubernetesDiscovery(kube, store, namespaces, poller)
        waker = KubernetesWaker(kube)
    keys: KeyRing | None = None
    keys_file: KeysFile | None = None
    limit = args.key_concurrency if args.key_concurrency > 0 else None
    if args.api_keys_file is not None:
        keys = KeyRing(default_max_concurrent=limit)
        keys_file = KeysFile(args.api_keys_file, keys)
        keys_file.load()
    else:
        log.warning("no --api-keys-file: authentication is OFF, anyone who reaches the router may use it")
    config = RouterConfig(
        max_body_bytes=args.max_body_bytes,
        key_concurrency=limit,
        connect_timeout=args.connect_timeout,
        head_timeout=args.head_timeout,
        stream_idle_timeout=args.stream_idle_timeout,
        max_retries=args.max_retries,
        max_json_depth=args.max_json_depth,
        access_log=args.access_log,
        serve_metrics=args.metrics_port is None,
    )
    limits = Limits(
        max_body=args.max_body_bytes,
        max_target=args.max_request_target_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
    )
    gateway = Gateway(store, waker, keys=keys, config=config, tokens=tokens)
    if isinstance(source, KubernetesDiscovery):
        gateway.ready = source.synced.is_set
    return RouterApp(
        gateway=gateway,
        source=source,
        poller=poller,
        keys_file=keys_file,
        kube=kube,
        limits=limits,
        budget=BodyBudget(args.max_buffered_bytes),
        metrics_port=args.metrics_port,
    )


def loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop to run on: uvloop unless asked otherwise (or not installed, with `auto`)."""
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


async def _serve(args: argparse.Namespace, loop_name: str) -> None:
    app = build_app(args)
    port = await app.start(args.host, args.port)
    log.info("router listening on %s:%d (%s)", args.host, port, loop_name)
    if app.metrics_server is not None:
        log.info("metrics on %s:%d/metrics", args.host, app.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("router stopping: no new connections, up to %gs for requests in progress", args.shutdown_grace)
    await app.stop(args.shutdown_grace)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    loop_name, factory = loop_factory(args.loop)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(args, loop_name))
    except (KeysFileError, OSError, ValueError) as exc:
        log.error("router cannot start: %s", exc)
        return 2
    return 0
