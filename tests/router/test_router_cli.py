"""`python -m loraserve.router` as its own process: static topology, keys file, uvloop; the openai client."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI

from tests.router.fakes import STREAM_TEXT, FakeBackend
from tests.router.harness import deployment, keys_yaml, wait_until

ROOT = Path(__file__).resolve().parents[2]


async def start_router(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loraserve.router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"router exited with {await proc.wait()}")
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                return proc, int(found.group(1))


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    b = FakeBackend(base_model="tiny-llama")
    await b.start()
    yield b
    await b.stop()


async def test_static_topology_process(backend: FakeBackend, tmp_path: Path) -> None:
    topo = tmp_path / "topology.yaml"
    topo.write_text(json.dumps({"resources": [deployment("d", "hf://org/tiny-llama")], "replicas": {"d": []}}))
    keys = tmp_path / "keys.yaml"
    keys.write_text(keys_yaml([{"name": "k", "key": "sk-cli"}]))
    proc, port = await start_router(
        "--static-topology",
        str(topo),
        "--api-keys-file",
        str(keys),
        "--loop",
        "uvloop",
        "--adapter-poll-interval",
        "0.1",
    )
    try:
        async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0) as client:
            assert [m.id async for m in client.models.list()] == ["tiny-llama#d"]
            # The file changes (a replica appears): the router re-reads it, a held request goes through.
            pending = asyncio.create_task(client.completions.create(model="tiny-llama#d", prompt="x"))
            await asyncio.sleep(0)
            topo.write_text(
                json.dumps({"resources": [deployment("d", "hf://org/tiny-llama")], "replicas": {"d": [backend.url]}})
            )
            assert (await pending).choices[0].text == "".join(STREAM_TEXT)
            with pytest.raises(openai.AuthenticationError):
                await client.with_options(api_key="sk-other").completions.create(model="tiny-llama#d", prompt="x")
            # SIGTERM: no new connections, but a request in progress still gets its answer.
            backend.hold = asyncio.Event()
            in_progress = asyncio.create_task(client.completions.create(model="tiny-llama#d", prompt="y"))
            await wait_until(lambda: len(backend.seen) == 2, "the request to reach the backend")
            proc.send_signal(signal.SIGTERM)
            assert proc.stderr is not None
            async with asyncio.timeout(60):
                while b"router stopping" not in await proc.stderr.readline():
                    pass
            backend.hold.set()
            assert (await in_progress).choices[0].text == "".join(STREAM_TEXT)
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_keys_file_refuses_to_start(tmp_path: Path) -> None:
    topo = tmp_path / "topology.yaml"
    topo.write_text("resources: []\n")
    keys = tmp_path / "keys.yaml"
    keys.write_text("- name: k\n  sha256: sk-this-is-not-a-digest\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loraserve.router",
        "--port",
        "0",
        "--static-topology",
        str(topo),
        "--api-keys-file",
        str(keys),
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"sha256 must be 64 hex digits" in err
    assert b"sk-this-is-not-a-digest" not in err
