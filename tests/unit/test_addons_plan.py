"""Pure LoraAddon decisions: acceptance, load/unload plans, the serverless pool."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from loraserve.addons import (
    Artifact,
    Replica,
    check,
    keep_warm,
    orphaned,
    out_of_step,
    owned_by,
    plan,
    pool_base,
    pool_gc,
    pool_members,
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


def test_orphaned_are_adapters_of_addons_gone_or_served_elsewhere() -> None:
    placements = {"bot": "prod", "bot-v2": "prod", "moved": "staging", "unseated": ""}
    loaded = {"bot-v1", "bot-v2-v1", "moved-v3", "gone-v1", "unseated-v1", "base-model", "gone-v0"}
    found = orphaned("prod", loaded, placements.get)
    # an addon whose name looks like a version keeps its own; a name the operator never gives is left alone
    assert found == ["gone-v1", "moved-v3"]
    assert orphaned("staging", {"moved-v3", "bot-v1"}, placements.get) == ["bot-v1"]
    assert orphaned("prod", set(), placements.get) == []


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
    members = [(False, f"2026-11-24T00:00:{i:02d}Z", f"a{i}") for i in range(5)]
    assert pool_seat("a0", members) == 0
    assert pool_seat("a4", list(reversed(members))) == 4
    # an older addon that turns serverless later does not evict one already seated (and loaded)
    members = [(True, "2026-11-24T00:00:09Z", "seated"), (False, "2020-01-01T00:00:00Z", "old")]
    assert (pool_seat("seated", members), pool_seat("old", members)) == (0, 1)


def serverless(name: str, mv: str, seated: str | None = None, **meta: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-11-24T00:00:00Z", **meta},
        "spec": {"targets": [{"modelVersion": mv, "weight": 100}]},
        "status": {"deployment": seated} if seated else {},
    }


def test_pool_members_count_only_this_pools_live_serverless_addons() -> None:
    pool = pool_name(BASE)
    bases = {"bot-v1": BASE, "other-v1": "hf://org/other"}
    items = [
        serverless("seated", "bot-v1", pool),
        serverless("waiting", "bot-v1"),  # not seated yet, same base: it will sit here
        serverless("elsewhere", "other-v1"),  # another base model's pool
        serverless("other-pool", "bot-v1", "serverless-x"),
        serverless("leaving", "bot-v1", pool, deletionTimestamp="2026-11-24T01:00:00Z"),
        serverless("unknown-version", "gone-v1"),
        {"metadata": {"name": "own"}, "spec": {"deployment": "d", "targets": [{"modelVersion": "bot-v1"}]}},
    ]
    members = pool_members(pool, BASE, items, bases)
    assert sorted(name for _, _, name in members) == ["seated", "waiting"]


def test_pool_garbage_collection_never_while_used() -> None:
    now, grace = 10_000.0, 600.0
    assert not pool_gc(1, 0, 0, None, 0.0, now, grace).delete  # an addon is seated
    assert not pool_gc(0, 1, 0, None, 0.0, now, grace).delete  # a request in flight
    assert not pool_gc(0, 0, 1, None, 0.0, now, grace).delete  # a request held (waking it)
    assert not pool_gc(0, 0, 0, now - 60, 0.0, now, grace).delete  # a recent request
    assert not pool_gc(0, 0, 0, None, now - 60, now, grace).delete  # just created, its addon not seated yet
    verdict = pool_gc(0, 0, 0, now - 700, 0.0, now, grace)
    assert verdict.delete
    assert "no addon left" in verdict.reason


def test_a_version_leaving_the_targets_stays_loaded_for_the_grace_then_goes() -> None:
    grace = timedelta(minutes=10)
    t0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    replica = Replica("p0", "10.0.0.1", frozenset({"bot-v1", "bot-v2"}))
    v1 = Artifact("bot-v1", "s3://a/v1", None)
    v2 = Artifact("bot-v2", "s3://a/v2", None)
    # rollback by hand: targets v2 -> v1; v2 is kept warm, nothing is unloaded or loaded
    warm = keep_warm({}, ["bot-v2"], {"bot-v1"}, t0, grace, idle=False)
    assert warm == {"bot-v2": "2026-11-26T09:00:00Z"}
    (step,) = plan("bot", [v1], set(warm), [replica])
    assert (step.load, step.unload) == ([], [])
    # flip back within the grace: v2 is already loaded, so it serves at once (no load step)
    (step,) = plan("bot", [v2], set(keep_warm(warm, ["bot-v1"], {"bot-v2"}, t0, grace, idle=False)), [replica])
    assert step.load == []
    assert step.unload == []
    # after the grace the retired version is unloaded
    later = keep_warm(warm, ["bot-v1"], {"bot-v1"}, t0 + grace, grace, idle=False)
    assert later == {}
    (step,) = plan("bot", [v1], set(later), [replica])
    assert step.unload == ["bot-v2"]
    assert keep_warm(warm, ["bot-v1"], set(), t0, grace, idle=True) == {}  # idle: everything goes


def test_next_look_is_the_earliest_deadline() -> None:
    from datetime import UTC, datetime, timedelta

    from loraserve.addons import keep_warm, next_look, warm_until

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    grace = timedelta(minutes=10)
    # v1 left the targets 4 minutes ago: it stays warm 6 more minutes, then the addon must look again.
    retired = keep_warm({"bot-v1": "2026-01-01T11:56:00Z"}, ["bot-v1", "bot-v2"], {"bot-v2"}, now, grace, False)
    assert next_look(now, resync=3600, warm_until=warm_until(retired, grace)) == 360
    later = now + timedelta(minutes=6)
    assert keep_warm(retired, ["bot-v2"], {"bot-v2"}, later, grace, False) == {}  # unloaded when it looks
    # an idle deadline, a retry and a rollback sample compete; the earliest wins; past deadlines mean now
    assert next_look(now, resync=300, idle_at=now + timedelta(seconds=90)) == 90
    assert next_look(now, resync=300, retry_at=[now + timedelta(seconds=4), now + timedelta(seconds=8)]) == 4
    assert next_look(now, resync=300, sample_every=2.0, idle_at=now + timedelta(hours=1)) == 2.0
    assert next_look(now, resync=300, idle_at=now - timedelta(seconds=5)) == 0.0
    assert next_look(now, resync=300) == 300


def test_idleness_unloads_after_the_window_and_a_request_wakes_it() -> None:
    from loraserve.addons import idleness

    hour = 3600.0
    created, now = 1_000_000.0, 1_000_000.0 + 5 * hour
    # no request since creation, window 4 h: idle
    quiet = idleness(now, [None, None, created, None], 4 * hour, 0.0, "READY")
    assert quiet.idle
    assert quiet.idle_at is None
    # a request an hour ago: not idle, turns idle 4 h after it
    busy = idleness(now, [now - hour, None, created, None], 4 * hour, 0.0, "READY")
    assert not busy.idle
    assert busy.idle_at == now + 3 * hour
    # unloaded, and a request is held for it: woken, a fresh idle period starts now
    held = idleness(now, [None, created, created, None], 4 * hour, 1.0, "UNLOADED")
    assert not held.idle
    assert held.woken
    assert held.last_request == now
    assert held.idle_at == now + 4 * hour
    # still unloaded, nothing new: stays idle, not woken
    still = idleness(now, [None, created, created, None], 4 * hour, 0.0, "UNLOADED")
    assert still.idle
    assert not still.woken


def test_verdict_order_failures_then_idle_then_readiness() -> None:
    from loraserve.addons import Refusal, verdict

    failed = verdict([Refusal("AdapterFetchFailed", "bot-v1 on pod-a: 404")], False, 60, 0, 2)
    assert (failed.state, failed.reason, failed.stalled) == ("FAILED", "AdapterFetchFailed", True)
    partly = verdict([Refusal("AdapterLoadFailed", "x")], False, 60, 1, 2)
    assert partly.state == "LOADING"
    assert verdict([], True, 60, 0, 2).state == "UNLOADED"
    assert verdict([], False, 60, 0, 0).state == "PENDING"
    loading = verdict([], False, 60, 1, 2)
    assert (loading.state, loading.reconciling, loading.message) == ("LOADING", True, "loaded on 1/2 ready replicas")
    ready = verdict([], False, 60, 2, 2)
    assert (ready.state, ready.ready, ready.reconciling, ready.stalled) == ("READY", True, False, False)


def test_capacity() -> None:
    from loraserve.addons import capacity

    assert capacity(4, 4) == (False, "WithinMaxLoras", "4 adapter versions for 4 GPU slots (maxLoras)")
    assert capacity(5, 4)[:2] == (True, "AdaptersExceedMaxLoras")


def test_a_deployments_resync_wakes_only_the_addons_its_replicas_are_out_of_step_with() -> None:
    status = {"servedNames": ["sql-v2"], "retired": {"sql-v1": "2026-01-01T00:10:00Z"}, "totalReplicas": 2}
    both = frozenset({"sql-v1", "sql-v2", "chat-v1"})
    assert not out_of_step("sql", status, [both, frozenset({"sql-v2"})])  # v1 kept warm, others' adapters
    assert out_of_step("sql", status, [both, frozenset({"chat-v1"})])  # v2 lost on a replica (restarted)
    assert out_of_step("sql", status, [both, None])  # a replica that did not answer
    assert out_of_step("sql", status, [both])  # a replica left (or came)
    assert out_of_step("sql", status, [both, frozenset({"sql-v2", "sql-v3"})])  # a version it does not serve
    idle = {"servedNames": [], "totalReplicas": 1}
    assert not out_of_step("sql", idle, [frozenset({"chat-v1", "sqlite-v1"})])  # unloaded while idle
    assert out_of_step("sql", idle, [frozenset({"sql-v1"})])  # an unload that was lost
    assert out_of_step("sql", {"state": "FAILED"}, [frozenset()])  # a refused addon looks again too
