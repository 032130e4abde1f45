"""The official openai client against the router, in front of a fast fake OpenAI backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from loraserve.router.gateway import RouterConfig
from loraserve.router.metrics import METRIC_NAMES
from loraserve.router.topology import SCALE_FROM_ZERO_TIMEOUT_ANNOTATION
from tests.router.fakes import STREAM_TEXT, FakeBackend
from tests.router.harness import NS, Harness, addon, deployment, model_version, start_router, wait_until

KEYS: list[dict[str, Any]] = [
    {"name": "all", "key": "sk-all"},
    {"name": "elsewhere", "key": "sk-elsewhere", "namespaces": ["other"]},
    {"name": "one-at-a-time", "key": "sk-one", "maxConcurrentRequests": 1},
]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


@dataclass
class Setup:
    router: Harness
    multi: FakeBackend
    merged: FakeBackend

    def client(self, key: str = "sk-all") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.router.openai_url, api_key=key, max_retries=0, timeout=30)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    multi = FakeBackend(base_model="tiny-llama", adapters={"support-bot-v1", "support-bot-v2"})
    merged = FakeBackend(base_model="support-bot-merged")
    await multi.start()
    await merged.start()
    router = await start_router(keys=KEYS, config=RouterConfig(max_body_bytes=64 * 1024))
    router.set(
        [
            deployment("llama-multi", "hf://org/tiny-llama"),
            deployment("support-bot-merged", model_version="support-bot-v2"),
            deployment("sleepy", annotations={SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "20ms"}),
            addon("support-bot", "llama-multi", [("support-bot-v1", 90), ("support-bot-v2", 10)]),
            model_version("support-bot-v1", "v1"),
            model_version("support-bot-v2", "v2"),
        ],
        replicas={(NS, "llama-multi"): [multi.url], (NS, "support-bot-merged"): [merged.url]},
        loaded={multi.url: {"support-bot-v1", "support-bot-v2"}},
    )
    yield Setup(router, multi, merged)
    await router.close()
    await multi.stop()
    await merged.stop()


async def test_chat_and_completion(setup: Setup) -> None:
    async with setup.client() as client:
        chat = await client.chat.completions.create(model="tiny-llama#llama-multi", messages=MESSAGES)
        assert chat.choices[0].message.content == "".join(STREAM_TEXT)
        assert chat.usage is not None
        assert chat.usage.completion_tokens == len(STREAM_TEXT)
        comp = await client.completions.create(model="tiny-llama#llama-multi", prompt="Hello", max_tokens=4)
        assert comp.choices[0].text == "".join(STREAM_TEXT)
    assert [s.path for s in setup.multi.seen] == ["/v1/chat/completions", "/v1/completions"]
    assert all(s.model == "tiny-llama" for s in setup.multi.seen)
    assert all("Authorization" not in s.headers for s in setup.multi.seen)  # the router's key stays here


async def test_streaming_chunk_by_chunk(setup: Setup) -> None:
    async with setup.client() as client:
        stream = await client.chat.completions.create(
            model="tiny-llama#llama-multi",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert pieces == list(STREAM_TEXT)
        stream2 = await client.completions.create(model="tiny-llama#llama-multi", prompt="x", stream=True)
        assert [c.choices[0].text async for c in stream2] == list(STREAM_TEXT)
    metrics = setup.router.gateway.metrics.render().decode()
    labels = 'addon="",deployment="llama-multi",namespace="default"'
    assert f"loraserve_router_output_tokens_total{{{labels}}} {float(len(STREAM_TEXT))}" in metrics
    assert f'loraserve_router_time_to_first_token_seconds_count{{{labels},version=""}} 2.0' in metrics


async def test_addon_by_hash_name_and_ab_split(setup: Setup) -> None:
    async with setup.client() as client:
        for i in range(40):
            r = await client.completions.create(model="support-bot#llama-multi", prompt="x", user=f"user-{i}")
            assert r.model in ("support-bot-v1", "support-bot-v2")
        sticky = {
            (await client.completions.create(model="support-bot#llama-multi", prompt="x", user="alice")).model
            for _ in range(10)
        }
        assert len(sticky) == 1
        pinned = await client.completions.create(model="support-bot-v2#llama-multi", prompt="x")
        assert pinned.model == "support-bot-v2"
        merged = await client.chat.completions.create(model="support-bot-merged", messages=MESSAGES)
        assert merged.model == "support-bot-merged"
    served = [s.model for s in setup.multi.seen[:40]]
    assert served.count("support-bot-v1") > served.count("support-bot-v2")
    assert [s.model for s in setup.merged.seen] == ["support-bot-merged"]


async def test_deployed_model_routes_with_deprecation_headers(setup: Setup) -> None:
    async with setup.client() as client:
        raw = await client.completions.with_raw_response.create(
            model="support-bot", prompt="x", extra_body={"deployedModel": "accounts/default/deployments/llama-multi"}
        )
        assert raw.headers["Deprecation"] == "true"
        assert raw.headers["Warning"] == (
            '299 - "deployedModel is deprecated; use model=\\"support-bot#accounts/default/deployments/llama-multi\\""'
        )
        assert raw.parse().model.startswith("support-bot-v")
        plain = await client.completions.with_raw_response.create(model="tiny-llama#llama-multi", prompt="x")
        assert "Deprecation" not in plain.headers
    assert all("deployedModel" not in s.body for s in setup.multi.seen)


async def test_models_list(setup: Setup) -> None:
    async with setup.client() as client:
        ids = [m.id async for m in client.models.list()]
    assert ids == [
        "tiny-llama#llama-multi",
        "support-bot#llama-multi",
        "tiny-llama#sleepy",
        "support-bot-merged",
        "support-bot-merged#support-bot-merged",
    ]
    async with setup.client("sk-elsewhere") as client:
        assert [m.id async for m in client.models.list()] == []


async def test_error_classes(setup: Setup) -> None:
    async with setup.client("sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as e401:
            await client.completions.create(model="tiny-llama#llama-multi", prompt="x")
        assert e401.value.code == "invalid_api_key"
    async with setup.client("sk-elsewhere") as client:  # out of its scope: absent for this key, as if unknown
        with pytest.raises(openai.NotFoundError) as hidden:
            await client.completions.create(model="tiny-llama#llama-multi", prompt="x")
        assert hidden.value.code == "deployment_not_found"
    async with setup.client() as client:
        with pytest.raises(openai.NotFoundError) as e404:
            await client.completions.create(model="nope#llama-multi", prompt="x")
        assert e404.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="tiny-llama#nope", prompt="x")
        with pytest.raises(openai.BadRequestError) as e400:
            await client.completions.create(model="", prompt="x")
        assert e400.value.param == "model"
        with pytest.raises(openai.APIStatusError) as e413:
            await client.completions.create(model="tiny-llama#llama-multi", prompt="x" * 100_000)
        assert e413.value.status_code == 413
        with pytest.raises(openai.InternalServerError) as e503:
            await client.completions.create(model="tiny-llama#sleepy", prompt="x")
        assert e503.value.status_code == 503
        assert e503.value.response.headers["Retry-After"]
    setup.multi.hold = asyncio.Event()
    async with setup.client("sk-one") as client:
        first = asyncio.create_task(client.completions.create(model="tiny-llama#llama-multi", prompt="x"))
        await wait_until(lambda: setup.multi.seen)
        with pytest.raises(openai.RateLimitError) as e429:
            await client.completions.create(model="tiny-llama#llama-multi", prompt="x")
        assert e429.value.code == "concurrency_limit_exceeded"
        setup.multi.hold.set()
        await first


async def test_client_disconnect_cancels_upstream(setup: Setup) -> None:
    setup.multi.chunk_delay = 0.05
    async with setup.client() as client:
        stream = await client.chat.completions.create(
            model="tiny-llama#llama-multi",
            messages=MESSAGES,
            stream=True,
        )
        async for _ in stream:
            break
        await stream.close()
    await wait_until(lambda: setup.multi.disconnects)
    assert setup.multi.completed_streams == 0
    metrics = setup.router.gateway.metrics.render().decode()
    assert 'loraserve_router_requests_in_flight{addon="",deployment="llama-multi",namespace="default"} 0.0' in metrics


async def test_metrics_endpoint(setup: Setup) -> None:
    async with setup.client() as client:
        await client.completions.create(model="support-bot#llama-multi", prompt="x")
        with pytest.raises(openai.InternalServerError):
            await client.completions.create(model="tiny-llama#sleepy", prompt="x")
    async with aiohttp.ClientSession() as s, s.get(setup.router.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    assert 'loraserve_router_requests_total{addon="support-bot",code="200",deployment="llama-multi"' in text
    assert 'loraserve_router_hold_timeouts_total{addon="",deployment="sleepy",namespace="default"} 1.0' in text
