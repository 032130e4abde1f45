"""The published OpenAPI description: generated from code, committed, served, and not stale."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from loraserve.router import openapi
from tests.router.harness import start_router


def test_committed_document_is_current(repo_root: Path) -> None:
    path = repo_root / "docs" / "router-openapi.json"
    assert path.read_text() == openapi.render(), (
        "docs/router-openapi.json is stale: run python -m loraserve.router.openapi --write docs/router-openapi.json"
    )
    assert openapi.main(["--check", str(path)]) == 0


def test_document_describes_what_the_router_serves() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/load",
        "/openapi.json",
    }
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(chat["responses"])
    schema = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert schema["properties"]["deployedModel"]["deprecated"] is True
    assert "<model>#<deployment>" in schema["properties"]["model"]["description"]


async def test_served_document_is_the_committed_one(repo_root: Path) -> None:
    h = await start_router()
    try:
        async with aiohttp.ClientSession() as s, s.get(h.url + "/openapi.json") as r:
            assert r.status == 200
            assert json.loads(await r.read()) == json.loads((repo_root / "docs" / "router-openapi.json").read_text())
    finally:
        await h.close()
