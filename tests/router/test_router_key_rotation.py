"""A rotated API-key Secret, as the kubelet updates a mounted Secret (an atomic swap of the `..data` link), on
the real router process: the new key works as soon as the router has re-read the file and from that moment
the old key is refused; a request that started under the old key still gets its answer."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.router.fakes import FakeBackend
from tests.router.harness import deployment, keys_yaml, wait_until
from tests.router.test_router_cli import start_router


class SecretVolume:
    """A folder laid out like the kubelet's Secret volume: keys.yaml -> ..data/keys.yaml -> ..<stamp>/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()
        (root / "keys.yaml").symlink_to("..data/keys.yaml")

    def write(self, text: str) -> None:
        self.generation += 1
        payload = self.root / f"..gen_{self.generation}"
        payload.mkdir()
        (payload / "keys.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(payload.name)
        os.replace(tmp, self.root / "..data")  # the kubelet's atomic switch

    @property
    def path(self) -> Path:
        return self.root / "keys.yaml"


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    b = FakeBackend(base_model="tiny-llama")
    await b.start()
    yield b
    await b.stop()


async def test_rotated_key_secret(backend: FakeBackend, tmp_path: Path) -> None:
    topo = tmp_path / "topology.yaml"
    topology = {"resources": [deployment("d", "hf://org/tiny-llama")], "replicas": {"d": [backend.url]}}
    topo.write_text(json.dumps(topology))
    volume = SecretVolume(tmp_path / "keys")
    volume.write(keys_yaml([{"name": "team-a", "key": "sk-old"}]))
    proc, port = await start_router("--static-topology", str(topo), "--api-keys-file", str(volume.path))
    assert proc.stderr is not None
    drain = asyncio.create_task(proc.stderr.read())  # keep the pipe from filling
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def call(session: aiohttp.ClientSession, key: str) -> int:
        body = {"model": "tiny-llama#d", "prompt": "x"}
        async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            return r.status

    try:
        async with aiohttp.ClientSession() as session:
            assert await call(session, "sk-old") == 200
            assert await call(session, "sk-new") == 401
            backend.hold = asyncio.Event()
            started_before = asyncio.create_task(call(session, "sk-old"))
            await wait_until(lambda: len(backend.seen) == 2, "the request to reach the backend")

            volume.write(keys_yaml([{"name": "team-a", "key": "sk-new"}]))
            backend.hold.set()
            backend.hold = None
            # The router re-reads the file within its reload interval (a bounded wait, not a timing claim).
            for _ in range(300):
                if await call(session, "sk-new") == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the router never accepted the rotated key")
            assert await call(session, "sk-old") == 401
            assert await call(session, "sk-new") == 200
            assert await started_before == 200  # in flight across the rotation: answered, not cut
            assert len(backend.seen) >= 3
            # Client keys never go upstream.
            assert not any("sk-" in v for s in backend.seen for v in s.headers.values())
    finally:
        proc.kill()
        await proc.wait()
        drain.cancel()
