"""The serverless pool's seats, read from the operator's index of serverless addons instead of a list of every
addon: an addon this operator has just seated holds its seat even while the watch has not brought its status
back (under load the watch runs minutes behind), so the pool never seats more than its capacity."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from loraserve import addons
from loraserve.api.addon import LoraAddonSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.handlers import addon as handler
from loraserve.handlers.deployment import CACHE

BASE = "hf://org/base"
VERSION = {"version": "v1", "baseModel": {"name": BASE, "revision": "r"}, "adapter": {"uri": "s3://adapters/bot"}}
SPEC = LoraAddonSpec.model_validate({"targets": [{"modelVersion": "bot-v1", "weight": 100}]})


def indexed(name: str, created: str) -> dict[str, Any]:
    """An addon as the index holds it: not seated, as its last event showed."""
    return {
        "metadata": {"name": name, "creationTimestamp": created, "deletionTimestamp": None},
        "spec": {"targets": [{"modelVersion": "bot-v1"}]},
        "status": {"deployment": None},
    }


@pytest.fixture
def one_seat(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    monkeypatch.setattr(addons, "POOL_CAPACITY", 1)
    monkeypatch.setitem(CACHE.versions, ("ns", "bot-v1"), {"metadata": {"resourceVersion": "1"}, "spec": VERSION})
    return {"ns": [indexed("early", "2026-11-24T00:00:00Z"), indexed("late", "2026-11-24T00:00:05Z")]}


async def test_a_seat_this_operator_gave_counts_before_its_event_comes_back(
    one_seat: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "late" was seated (its status written) while "early" was not read yet; the watch still shows neither
    monkeypatch.setitem(handler._followed, ("ns", "late"), SimpleNamespace(served_on=addons.pool_name(BASE)))
    versions = {"bot-v1": ModelVersionSpec.model_validate(VERSION)}
    refused = await handler._serverless_pool("early", "ns", SPEC, versions, one_seat)  # type: ignore[arg-type]
    assert isinstance(refused, addons.Refusal)
    assert refused.reason == "ServerlessPoolFull"


async def test_without_a_seat_given_the_older_addon_comes_first(one_seat: dict[str, list[dict[str, Any]]]) -> None:
    pool = addons.pool_name(BASE)
    members = await handler._pool_members("ns", pool, BASE, one_seat)  # type: ignore[arg-type]
    assert addons.pool_seat("early", members) == 0
    assert addons.pool_seat("late", members) == 1
