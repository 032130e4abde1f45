"""Release safety through the router, in front of a fake vLLM: each version's pinned system prompt, the
automatic rollback fed by the router's own per-version metrics, and serverless addons called by name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from loraserve.api.addon import LoraAddonSpec
from loraserve.autoscale.signals import RouterLoad
from loraserve.rollback import History, decide, version_counters, versions_by_addon
from tests.router.fakes import FakeBackend
from tests.router.harness import NS, Harness, addon, deployment, model_version, start_router

PROMPTS = {"bot-v1": "You are v1. Answer in English.", "bot-v2": "You are v2. Answer in French."}


def resources(policy: str | None = None, status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    bot = addon("bot", "d", [("bot-v1", 50), ("bot-v2", 50)])
    bot["metadata"]["generation"] = 1
    bot["spec"]["autoRollback"] = {"maxErrorRate": 0.1, "minRequests": 10, "window": "5m"}
    if policy:
        bot["spec"]["systemPromptPolicy"] = policy
    if status:
        bot["status"] = status
    versions = []
    for name, label in (("bot-v1", "v1"), ("bot-v2", "v2")):
        mv = model_version(name, label)
        mv["spec"]["systemPrompt"] = PROMPTS[name]
        versions.append(mv)
    pool = deployment("serverless-tiny-llama-abc123")
    pool["metadata"]["labels"] = {"serving.loraserve.dev/serverless-pool": "true"}
    haiku = addon("haiku", "", [("bot-v1", 100)])
    haiku["status"] = {"deployment": "serverless-tiny-llama-abc123"}
    return [deployment("d"), pool, bot, haiku, *versions]


@pytest.fixture
async def router_and_backend() -> AsyncIterator[tuple[Harness, FakeBackend, FakeBackend]]:
    backend = FakeBackend(base_model="tiny-llama", adapters={"bot-v1", "bot-v2"})
    pool_backend = FakeBackend(base_model="tiny-llama", adapters={"haiku-v1"})
    await backend.start()
    await pool_backend.start()
    router = await start_router()
    yield router, backend, pool_backend
    await router.close()
    await backend.stop()
    await pool_backend.stop()


def apply(router: Harness, backend: FakeBackend, pool: FakeBackend, **kw: Any) -> None:
    router.set(
        resources(**kw),
        replicas={(NS, "d"): [backend.url], (NS, "serverless-tiny-llama-abc123"): [pool.url]},
        loaded={backend.url: {"bot-v1", "bot-v2"}, pool.url: {"haiku-v1"}},
    )


def client(router: Harness) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=router.openai_url, api_key="unused", max_retries=0, timeout=30)


async def test_each_version_of_an_ab_split_gets_its_own_system_prompt(
    router_and_backend: tuple[Harness, FakeBackend, FakeBackend],
) -> None:
    router, backend, pool = router_and_backend
    apply(router, backend, pool)
    async with client(router) as c:
        for i in range(20):
            await c.chat.completions.create(
                model="bot#d", messages=[{"role": "user", "content": "hello"}], user=f"user-{i}"
            )
        await c.completions.create(model="bot#d", prompt="raw text", user="user-0")
    chats = [s for s in backend.seen if s.path == "/v1/chat/completions"]
    assert {s.model for s in chats} == {"bot-v1", "bot-v2"}  # both sides of the split were used
    for seen in chats:
        assert seen.body["messages"] == [
            {"role": "system", "content": PROMPTS[seen.model]},
            {"role": "user", "content": "hello"},
        ]
    (raw,) = [s for s in backend.seen if s.path == "/v1/completions"]
    assert raw.body["prompt"] == "raw text"  # a completion has no system message to set


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (None, [{"role": "system", "content": PROMPTS["bot-v1"] + "\n\nBe terse."}]),
        ("replace", [{"role": "system", "content": PROMPTS["bot-v1"]}]),
        ("keepUser", [{"role": "system", "content": "Be terse."}]),
    ],
)
async def test_the_addon_policy_decides_about_the_clients_own_system_message(
    router_and_backend: tuple[Harness, FakeBackend, FakeBackend], policy: str | None, expected: list[Any]
) -> None:
    router, backend, pool = router_and_backend
    apply(router, backend, pool, policy=policy)
    async with client(router) as c:
        await c.chat.completions.create(
            model="bot-v1#d",  # the version pinned: its prompt, whatever the split
            messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello"}],
        )
    assert backend.seen[-1].body["messages"] == [*expected, {"role": "user", "content": "hello"}]


async def test_a_failing_version_is_rolled_back_from_the_routers_own_metrics(
    router_and_backend: tuple[Harness, FakeBackend, FakeBackend],
) -> None:
    router, backend, pool = router_and_backend
    apply(router, backend, pool)
    backend.failing = {"bot-v2"}  # the treatment breaks under traffic
    history = History()
    spec = LoraAddonSpec.model_validate(resources()[2]["spec"])
    labels = {"bot-v1": "v1", "bot-v2": "v2"}

    def observe(at: float) -> dict[str, Any]:
        load = RouterLoad.model_validate_json(router.gateway.metrics.load(versions=True))
        history.add(at, version_counters(versions_by_addon([load]).get((NS, "d", "bot"), [])), 300)
        return history.delta()

    observe(0.0)
    errors = 0
    async with client(router) as c:
        for i in range(40):
            try:
                await c.chat.completions.create(
                    model="bot#d", messages=[{"role": "user", "content": "x"}], user=f"u{i}"
                )
            except openai.InternalServerError:
                errors += 1
    assert errors > 0
    decision = decide(spec, 1, None, None, labels, observe(10.0), datetime(2026, 11, 26, tzinfo=UTC))
    assert decision.fired is not None
    assert (decision.fired.model_version, decision.fired.metric, decision.fired.value) == ("bot-v2", "errorRate", 1.0)
    assert decision.fired.requests == errors

    # The operator writes this into status only; the router routes by it: no request reaches v2 any more.
    apply(router, backend, pool, status={"effectiveTargets": decision.effective, "autoRollback": decision.status})
    before = len(backend.seen)
    async with client(router) as c:
        for i in range(30):
            await c.chat.completions.create(model="bot#d", messages=[{"role": "user", "content": "x"}], user=f"u{i}")
    assert {s.model for s in backend.seen[before:]} == {"bot-v1"}


async def test_a_serverless_addon_is_called_by_its_own_name(
    router_and_backend: tuple[Harness, FakeBackend, FakeBackend],
) -> None:
    router, backend, pool = router_and_backend
    apply(router, backend, pool)
    async with client(router) as c:
        for model in ("haiku", f"accounts/{NS}/models/haiku"):
            out = await c.completions.create(model=model, prompt="x")
            assert out.model == "haiku-v1"
        with pytest.raises(openai.NotFoundError, match="serverless addon"):
            await c.completions.create(model="nobody", prompt="x")
    assert [s.model for s in pool.seen] == ["haiku-v1", "haiku-v1"]
