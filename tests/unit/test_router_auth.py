"""API keys: the keys file, constant-time lookup by SHA-256, per-key scope and concurrency, over HTTP too."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from loraserve.router.auth import KeyRing, KeysFileError, hash_key, parse_keys
from tests.router.fakes import FakeBackend
from tests.router.harness import NS, Harness, addon, deployment, keys_yaml, model_version, start_router, wait_until

KEYS: list[dict[str, Any]] = [
    {"name": "admin", "key": "sk-admin-secret"},
    {"name": "team-a", "key": "sk-team-a", "namespaces": ["default"], "deployments": ["d"]},
    {"name": "team-b", "key": "sk-team-b", "namespaces": ["other"], "maxConcurrentRequests": 1},
]


def test_parse_and_authenticate() -> None:
    ring = KeyRing(parse_keys(keys_yaml(KEYS)))
    assert len(ring) == 3
    admin = ring.authenticate("Bearer sk-admin-secret")
    assert admin is not None
    assert admin.name == "admin"
    assert admin.namespaces is None
    assert ring.authenticate(b"bearer   sk-team-a") is not None
    for bad in (None, "", "Bearer", "Bearer ", "Basic sk-admin-secret", "Bearer sk-admin-secre", "sk-admin-secret"):
        assert ring.authenticate(bad) is None, bad


def test_scope() -> None:
    ring = KeyRing(parse_keys(keys_yaml(KEYS)))
    a = ring.authenticate("Bearer sk-team-a")
    b = ring.authenticate("Bearer sk-team-b")
    assert a is not None
    assert b is not None
    assert a.allows("default", "d")
    assert not a.allows("default", "e")
    assert not a.allows("other", "d")
    assert b.allows("other", "anything")
    assert not b.allows("default", "d")
    star = parse_keys(keys_yaml([{"name": "s", "key": "k", "namespaces": ["*"], "deployments": ["ns1/x"]}]))[0]
    assert star.allows("ns1", "x")
    assert not star.allows("ns2", "x")


def test_hash_key_matches_file_format() -> None:
    assert hash_key("sk-admin-secret") == parse_keys(keys_yaml(KEYS[:1]))[0].digest.hex()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{a: [", "not YAML"),
        ("just a string", "must be a YAML list"),
        ("- name: x\n  sha256: abc\n", "64 hex"),
        ("- sha256: " + "a" * 64 + "\n", "name is required"),
        ("- {name: x, sha256: " + "a" * 64 + "}\n- {name: x, sha256: " + "b" * 64 + "}\n", "duplicate"),
        ("- {name: x, sha256: " + "a" * 64 + ", namespaces: 3}\n", "list of names"),
        ("- {name: x, sha256: " + "a" * 64 + ", maxConcurrentRequests: 0}\n", "positive"),
    ],
)
def test_bad_keys_files(text: str, message: str) -> None:
    with pytest.raises(KeysFileError, match=message):
        parse_keys(text)


def test_reload_keeps_in_flight() -> None:
    ring = KeyRing(parse_keys(keys_yaml(KEYS)))
    key = ring.authenticate("Bearer sk-team-b")
    assert key is not None
    assert ring.acquire(key) is None
    ring.replace(parse_keys(keys_yaml(KEYS)))
    again = ring.authenticate("Bearer sk-team-b")
    assert again is not None
    assert again is not key
    assert ring.in_flight(again.name) == 1


def test_rotation_under_load_does_not_leak_the_concurrency_slot() -> None:
    """A key with a limit rotated while its request is in flight: the request ends under the old key object,
    and the new key must get the slot back (before: refused forever)."""
    old_entries = [{"name": "team", "key": "sk-old", "maxConcurrentRequests": 1}]
    ring = KeyRing(parse_keys(keys_yaml(old_entries)))
    old = ring.authenticate("Bearer sk-old")
    assert old is not None
    assert ring.acquire(old) is None
    ring.replace(parse_keys(keys_yaml([{"name": "team", "key": "sk-new", "maxConcurrentRequests": 1}])))
    assert ring.authenticate("Bearer sk-old") is None
    new = ring.authenticate("Bearer sk-new")
    assert new is not None
    assert ring.acquire(new) == 1  # the old key's request still counts against the name
    ring.release(old.name)  # ... until it ends
    assert ring.acquire(new) is None
    ring.release(new.name)
    assert ring.in_flight("team") == 0


# -- over HTTP


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Harness, FakeBackend]]:
    backend = FakeBackend(adapters={"bot-v1"})
    await backend.start()
    harness = await start_router(keys=KEYS)
    harness.set(
        [
            deployment("d"),
            deployment("e"),
            deployment("d", ns="other"),
            addon("bot", "d", [("bot-v1", 100)]),
            model_version("bot-v1", "v1"),
        ],
        replicas={(NS, "d"): [backend.url], (NS, "e"): [backend.url], ("other", "d"): [backend.url]},
        loaded={backend.url: {"bot-v1"}},
    )
    yield harness, backend
    await harness.close()
    await backend.stop()


async def post(harness: Harness, body: object, key: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{harness.url}/v1/completions", json=body, headers=headers) as r,
    ):
        return r.status, await r.json()


async def test_http_auth_codes(setup: tuple[Harness, FakeBackend]) -> None:
    harness, _ = setup
    body = {"model": "tiny-llama#accounts/default/deployments/d", "prompt": "secret prompt"}
    assert (await post(harness, body, None))[0] == 401
    assert (await post(harness, body, "sk-wrong"))[0] == 401
    assert (await post(harness, body, "sk-admin-secret"))[0] == 200
    assert (await post(harness, body, "sk-team-a"))[0] == 200
    # Out of the key's scope is answered exactly as if it did not exist: a key cannot probe other teams' names.
    status, err = await post(harness, {**body, "model": "tiny-llama#accounts/default/deployments/e"}, "sk-team-a")
    absent = await post(harness, {**body, "model": "tiny-llama#accounts/default/deployments/nope"}, "sk-team-a")
    assert status == absent[0] == 404
    assert err == {
        "error": {
            "message": "The deployment 'accounts/default/deployments/e' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "deployment_not_found",
        }
    }
    assert json.dumps(absent[1]).replace("nope", "e") == json.dumps(err)
    assert (await post(harness, body, "sk-team-b"))[0] == 404
    # An unqualified name that exists in two namespaces resolves within the key's namespaces.
    assert (await post(harness, {**body, "model": "tiny-llama#d"}, "sk-team-b"))[0] == 200


async def test_http_models_list_is_scoped(setup: tuple[Harness, FakeBackend]) -> None:
    harness, _ = setup
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{harness.url}/v1/models") as r:
            assert r.status == 401
        async with s.get(f"{harness.url}/v1/models", headers={"Authorization": "Bearer sk-team-a"}) as r:
            ids = [m["id"] for m in (await r.json())["data"]]
    # Only its own deployment, named as this key calls it: that another namespace has a "d" too is not its to know.
    assert ids == ["tiny-llama#d", "bot#d"]
    admin = {"Authorization": "Bearer sk-admin-secret"}
    async with aiohttp.ClientSession() as s, s.get(f"{harness.url}/v1/models", headers=admin) as r:
        everything = [m["id"] for m in (await r.json())["data"]]
    assert "accounts/default/models/tiny-llama#accounts/default/deployments/d" in everything
    assert "accounts/other/models/tiny-llama#accounts/other/deployments/d" in everything


async def test_http_per_key_concurrency(setup: tuple[Harness, FakeBackend]) -> None:
    harness, backend = setup
    backend.hold = asyncio.Event()
    body = {"model": "tiny-llama#accounts/other/deployments/d", "prompt": "p"}
    first = asyncio.create_task(post(harness, body, "sk-team-b"))
    await wait_until(lambda: backend.seen)
    status, err = await post(harness, body, "sk-team-b")
    assert status == 429
    assert err["error"]["code"] == "concurrency_limit_exceeded"  # type: ignore[index]
    backend.hold.set()
    assert (await first)[0] == 200
    assert (await post(harness, body, "sk-team-b"))[0] == 200


async def test_no_key_and_no_prompt_in_logs(
    setup: tuple[Harness, FakeBackend], caplog: pytest.LogCaptureFixture
) -> None:
    harness, _ = setup
    harness.gateway.config.access_log = True
    caplog.set_level(logging.DEBUG)
    body = {"model": "tiny-llama#accounts/default/deployments/d", "prompt": "the-secret-prompt"}
    await post(harness, body, "sk-admin-secret")
    await post(harness, body, "sk-not-a-key")
    await post(harness, {**body, "model": "nope#d"}, "sk-admin-secret")
    text = caplog.text
    assert "default/d" in text
    assert "key=admin" in text
    assert "sk-admin-secret" not in text
    assert "sk-not-a-key" not in text
    assert "the-secret-prompt" not in text
