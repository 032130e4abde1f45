"""API-key scope holds whichever way a client names the model: `<model>#<deployment>`, the qualified
`accounts/<ns>/models/<m>#accounts/<ns>/deployments/<d>` (either side), an addon, and the legacy
`deployedModel` body key. A key scoped to one deployment reaches it by every form and no other deployment
by any form; the chart's generated key (every namespace) reaches all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.router.fakes import FakeBackend
from tests.router.harness import Harness, addon, deployment, model_version, start_router

KEYS: list[dict[str, Any]] = [
    {"name": "team-a", "key": "sk-team-a", "namespaces": ["default"], "deployments": ["d"]},
    {"name": "team-other", "key": "sk-other", "namespaces": ["other"]},
    # What the chart generates when no keys are named: one key, every namespace.
    {"name": "loraserve-default", "key": "lsk-generated", "namespaces": ["*"]},
]


def forms(dep: str, ns: str = "default") -> list[tuple[str, dict[str, Any]]]:
    """(label, request body) for every way of naming the base model and the addon on deployment `dep`."""
    qualified = f"accounts/{ns}/deployments/{dep}"
    return [
        ("model#dep", {"model": f"tiny-llama#{dep}"}),
        ("model#qualified-dep", {"model": f"tiny-llama#{qualified}"}),
        ("qualified-model#qualified-dep", {"model": f"accounts/{ns}/models/tiny-llama#{qualified}"}),
        ("qualified-model#dep", {"model": f"accounts/{ns}/models/tiny-llama#{dep}"}),
        ("addon#dep", {"model": f"bot#{dep}"}),
        ("legacy deployedModel", {"model": "tiny-llama", "deployedModel": qualified}),
        ("legacy deployedModel, addon", {"model": "bot", "deployedModel": qualified}),
    ]


@pytest.fixture
async def router() -> AsyncIterator[Harness]:
    backend = FakeBackend(adapters={"bot-v1"})
    await backend.start()
    harness = await start_router(keys=KEYS)
    harness.set(
        [
            deployment("d"),
            deployment("e"),
            deployment("d", ns="other"),
            addon("bot", "d", [("bot-v1", 100)]),
            addon("bot", "e", [("bot-v1", 100)]),
            addon("bot", "d", [("bot-v1", 100)], ns="other"),
            model_version("bot-v1", "v1", ns="other"),
            model_version("bot-v1", "v1"),
        ],
        replicas={("default", "d"): [backend.url], ("default", "e"): [backend.url], ("other", "d"): [backend.url]},
        loaded={backend.url: {"bot-v1"}},
    )
    yield harness
    await harness.close()
    await backend.stop()


async def status(harness: Harness, body: dict[str, Any], key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{harness.url}/v1/completions", json={**body, "prompt": "p"}, headers=headers) as r,
    ):
        await r.read()
        return r.status


async def test_a_scoped_key_reaches_its_deployment_by_every_name(router: Harness) -> None:
    results = {label: await status(router, body, "sk-team-a") for label, body in forms("d")}
    assert results == {label: 200 for label, _ in forms("d")}


async def test_a_scoped_key_reaches_no_other_deployment_by_any_name(router: Harness) -> None:
    refused = {label: await status(router, body, "sk-team-a") for label, body in forms("e")}
    assert refused == {label: 404 for label, _ in forms("e")}  # out of scope = absent for this key
    # Another namespace's deployment of the same name, asked for by its qualified names.
    qualified = [(label, body) for label, body in forms("d", ns="other") if "qualified" in label or "legacy" in label]
    assert {label: await status(router, body, "sk-team-a") for label, body in qualified} == {
        label: 404 for label, _ in qualified
    }


async def test_an_unqualified_name_never_crosses_into_a_namespace_the_key_lacks(router: Harness) -> None:
    # team-other may use namespace "other" only: "tiny-llama#d" means other/d for it, never default/d.
    assert await status(router, {"model": "tiny-llama#d"}, "sk-other") == 200
    assert await status(router, {"model": "tiny-llama#accounts/default/deployments/d"}, "sk-other") == 404
    assert await status(router, {"model": "tiny-llama#e"}, "sk-other") == 404


async def test_no_key_or_a_wrong_key_is_refused_by_every_name(router: Harness) -> None:
    for label, body in forms("d"):
        assert await status(router, body, None) == 401, label
        assert await status(router, body, "lsk-not-it") == 401, label


async def test_the_generated_key_reaches_every_deployment(router: Harness) -> None:
    for label, body in forms("e"):
        assert await status(router, body, "lsk-generated") == 200, label
    for ns in ("default", "other"):
        for label, body in forms("d", ns):
            if "qualified" in label:
                assert await status(router, body, "lsk-generated") == 200, (ns, label)
    # "d" alone is in two namespaces this key may use: ambiguous, refused with the qualified form to use.
    assert await status(router, {"model": "tiny-llama#d"}, "lsk-generated") == 400
