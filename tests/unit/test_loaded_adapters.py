"""The per-replica cache of vLLM's loaded adapters: an answer that predates a load finished meanwhile must not
hide it (an addon looking again would load it a second time: vLLM answers 400 "already loaded")."""

from __future__ import annotations

import asyncio

import pytest

from loraserve import addons
from loraserve.handlers import addon


def test_a_load_finished_while_vllm_was_asked_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        asked, answer = asyncio.Event(), asyncio.Event()

        async def loaded_adapters(self: object) -> list[str]:
            asked.set()
            await answer.wait()
            return ["old"]  # listed before the load below finished

        monkeypatch.setattr(addon.VllmAdmin, "loaded_adapters", loaded_adapters)
        cache = addon.LoadedAdapters()
        replica = addons.Replica("pod-a", "10.0.0.1", frozenset())
        looking = asyncio.ensure_future(cache.observe(None, "pod-a", "10.0.0.1"))  # type: ignore[arg-type]
        await asyncio.wait_for(asked.wait(), 5)
        cache.changed(replica, loaded="new")
        cache.changed(replica, unloaded="old")
        answer.set()
        seen = await looking
        assert seen is not None
        assert seen.loaded == frozenset({"new"})
        again = await cache.observe(None, "pod-a", "10.0.0.1")  # type: ignore[arg-type]
        assert again is not None
        assert again.loaded == frozenset({"new"})

    asyncio.run(scenario())


def test_changes_after_the_answer_update_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async def loaded_adapters(self: object) -> list[str]:
            return ["a"]

        monkeypatch.setattr(addon.VllmAdmin, "loaded_adapters", loaded_adapters)
        cache = addon.LoadedAdapters()
        first = await cache.observe(None, "pod-a", "10.0.0.1")  # type: ignore[arg-type]
        assert first is not None
        cache.changed(first, loaded="b")
        cache.changed(first, unloaded="a")
        seen = await cache.observe(None, "pod-a", "10.0.0.1")  # type: ignore[arg-type]
        assert seen is not None
        assert seen.loaded == frozenset({"b"})

    asyncio.run(scenario())
