"""Pure LoraAddon decisions: acceptance, load/unload plans, the serverless pool."""

from __future__ import annotations

import re

from loraserve.addons import (
    Artifact,
    Replica,
    check,
    owned_by,
    plan,
    pool_base,
    pool_name,
    pool_seat,
    pool_spec,
)
from loraserve.api.addon import LoraAddonSpec
from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec

BASE = "hf://meta-llama/Llama-3.1-8B-Instruct"


def version(label: str, base: str = BASE, rank: int = 8) -> ModelVersionSpec:
    return ModelVersionSpec.model_validate(
        {
            "version": label,
            "baseModel": {"name": base, "revision": "r"},
            "adapter": {"uri": "s3://adapters/bot", "rank": rank},
        }
    )


ADDON = LoraAddonSpec.model_validate({"deployment": "pool", "targets": [{"modelVersion": "bot-v1", "weight": 100}]})
MULTI = DeploymentSpec.model_validate({"baseModel": BASE, "enableAddons": True})


def test_refusals_name_the_reason() -> None:
    assert check("bot", ADDON, "pool", None, {"bot-v1": version("v1")}).reason == "DeploymentNotFound"  # type: ignore[union-attr]
    plain = DeploymentSpec.model_validate({"baseModel": BASE})
    assert check("bot", ADDON, "pool", plain, {"bot-v1": version("v1")}).reason == "AddonsNotEnabled"  # type: ignore[union-attr]
    other = check("bot", ADDON, "pool", MULTI, {"bot-v1": version("v1", base="hf://x/other")})
    assert other is not None
    assert other.reason == "BaseModelMismatch"
    assert "hf://x/other" in other.message
    assert check("bot", ADDON, "pool", MULTI, {"bot-v1": version("v1", rank=64)}).reason == "AdapterRankTooHigh"  # type: ignore[union-attr]
    assert check("bot", ADDON, "pool", MULTI, {"bot-v1": None}).reason == "ModelVersionNotFound"  # type: ignore[union-attr]
    assert check("bot", ADDON, "pool", MULTI, {"bot-v1": version("v1")}) is None


def test_plan_loads_missing_and_unloads_only_own_retired_versions() -> None:
    wanted = [Artifact("bot-v2", "s3://a/v2", None)]
    fresh = Replica("r0", "10.0.0.1", frozenset())
    busy = Replica("r1", "10.0.0.2", frozenset({"bot-v1", "bot-v2", "bot-extra-v1", "other-v1"}))
    plans = {p.replica.name: p for p in plan("bot", wanted, set(), [fresh, busy])}
    assert [a.served_name for a in plans["r0"].load] == ["bot-v2"]  # a restarted or new replica gets everything
    assert plans["r1"].load == []
    assert plans["r1"].unload == ["bot-v1"]  # never another addon's, even one whose name starts the same
    warm = {p.replica.name: p for p in plan("bot", wanted, {"bot-v1"}, [busy])}
    assert warm["r1"].unload == []  # rollback grace keeps the previous version warm


def test_owned_by_is_exact() -> None:
    assert owned_by("bot", "bot-v12")
    assert not owned_by("bot", "bot-extra-v1")
    assert not owned_by("bot", "bot-v0")


def test_pool_name_is_stable_short_and_dns() -> None:
    name = pool_name(BASE)
    assert name == pool_name(BASE)
    assert name != pool_name("hf://meta-llama/Llama-3.1-70B-Instruct")
    assert len(name) <= 40
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert len(pool_name("hf://org/" + "X" * 200)) <= 40


def test_pool_base_and_spec() -> None:
    two = LoraAddonSpec.model_validate(
        {"targets": [{"modelVersion": "a", "weight": 50}, {"modelVersion": "b", "weight": 50}]}
    )
    assert pool_base(two, {"a": version("v1"), "b": version("v2")}) == BASE
    mixed = pool_base(two, {"a": version("v1"), "b": version("v2", base="hf://x/y")})
    assert not isinstance(mixed, str)
    assert mixed.reason == "BaseModelMismatch"
    spec = DeploymentSpec.model_validate(pool_spec(BASE, {"region": "eu-west-1"}))
    assert spec.enable_addons
    assert spec.min_replicas == 0
    assert spec.region == "eu-west-1"


def test_pool_seats_first_come_first_served() -> None:
    members = [(f"2026-11-24T00:00:{i:02d}Z", f"a{i}") for i in range(5)]
    assert pool_seat("a0", members) == 0
    assert pool_seat("a4", list(reversed(members))) == 4
