"""Model-name resolution: `<model>#<deployment>`, qualified names, live merge, legacy deployedModel."""

from __future__ import annotations

import pytest

from loraserve.router.errors import RouterError
from loraserve.router.model_names import ModelRef, NameRef, model_ids, parse_model, resolve
from loraserve.router.topology import TopologyStore, build_deployments
from tests.router.harness import addon, deployment, model_version


@pytest.fixture
def store() -> TopologyStore:
    s = TopologyStore()
    s.replace(
        build_deployments(
            [
                deployment("llama-multi", "hf://meta-llama/Llama-3.1-8B-Instruct"),
                deployment("support-bot-merged", model_version="support-bot-v2"),
                deployment("shared", "hf://org/tiny-llama", ns="team-a"),
                deployment("shared", "hf://org/tiny-llama", ns="team-b"),
            ],
            [addon("support-bot", "llama-multi", [("support-bot-v1", 90), ("support-bot-v2", 10)])],
            [model_version("support-bot-v1", "v1"), model_version("support-bot-v2", "v2")],
            [],
        )
    )
    return s


def test_parse_forms() -> None:
    assert parse_model("m#d") == ModelRef(NameRef("m"), NameRef("d"))
    assert parse_model("accounts/ns/models/m#accounts/ns/deployments/d") == ModelRef(
        NameRef("m", "ns"), NameRef("d", "ns")
    )
    assert parse_model("m#accounts/ns/deployments/d") == ModelRef(NameRef("m"), NameRef("d", "ns"))
    assert parse_model("merged") == ModelRef(None, NameRef("merged"))
    assert parse_model("accounts/ns/deployments/merged") == ModelRef(None, NameRef("merged", "ns"))
    assert parse_model("m", deployed_model="d") == ModelRef(NameRef("m"), NameRef("d"))
    assert parse_model("m", deployed_model="accounts/x/deployments/d") == ModelRef(NameRef("m"), NameRef("d", "x"))
    assert parse_model("  m#d ") == ModelRef(NameRef("m"), NameRef("d"))


@pytest.mark.parametrize(
    "model",
    ["", "#d", "m#", "m#d#e", "accounts/ns/models/m#accounts/ns/wrong/d", "a/b#d", "m#accounts//deployments/d"],
)
def test_parse_refuses(model: str) -> None:
    with pytest.raises(RouterError) as info:
        parse_model(model)
    assert info.value.status == 400
    assert info.value.param == "model"


def test_parse_conflicting_deployed_model() -> None:
    with pytest.raises(RouterError) as info:
        parse_model("m#d", deployed_model="other")
    assert info.value.status == 400
    assert parse_model("m#d", deployed_model="d") == ModelRef(NameRef("m"), NameRef("d"))


def test_resolve_base(store: TopologyStore) -> None:
    res = resolve(parse_model("Llama-3.1-8B-Instruct#llama-multi"), store)
    assert res.key == ("default", "llama-multi")
    assert res.addon is None
    assert res.versions == ()
    assert res.canonical == "Llama-3.1-8B-Instruct#llama-multi"


def test_resolve_addon_has_weighted_versions(store: TopologyStore) -> None:
    res = resolve(parse_model("support-bot#llama-multi"), store)
    assert res.addon == "support-bot"
    assert [(v.served_name, v.weight) for v in res.versions] == [("support-bot-v1", 90), ("support-bot-v2", 10)]


def test_resolve_pinned_version(store: TopologyStore) -> None:
    res = resolve(parse_model("support-bot-v2#llama-multi"), store)
    assert res.addon == "support-bot"
    assert [v.served_name for v in res.versions] == ["support-bot-v2"]


def test_resolve_qualified(store: TopologyStore) -> None:
    res = resolve(parse_model("accounts/default/models/support-bot#accounts/default/deployments/llama-multi"), store)
    assert res.addon == "support-bot"
    assert res.canonical == "accounts/default/models/support-bot#accounts/default/deployments/llama-multi"
    with pytest.raises(RouterError) as info:
        resolve(parse_model("accounts/other/models/support-bot#accounts/default/deployments/llama-multi"), store)
    assert info.value.status == 400


def test_resolve_live_merge_by_name(store: TopologyStore) -> None:
    res = resolve(parse_model("support-bot-merged"), store)
    assert res.key == ("default", "support-bot-merged")
    assert res.addon is None
    assert res.deployment.view.base_model == "support-bot-merged"
    assert resolve(parse_model("support-bot-merged#support-bot-merged"), store).addon is None


def test_bare_name_of_multi_lora_deployment_is_404_with_hint(store: TopologyStore) -> None:
    with pytest.raises(RouterError) as info:
        resolve(parse_model("llama-multi"), store)
    assert info.value.status == 404
    assert "Llama-3.1-8B-Instruct#llama-multi" in info.value.message


def test_unknown_names_are_404(store: TopologyStore) -> None:
    for model, code in [
        ("x#nope", "deployment_not_found"),
        ("nope#llama-multi", "model_not_found"),
        ("tiny-llama", "model_not_found"),
        ("accounts/default/models/x", "model_not_found"),
    ]:
        with pytest.raises(RouterError) as info:
            resolve(parse_model(model), store)
        assert (info.value.status, info.value.code) == (404, code), model


def test_ambiguous_unqualified_deployment(store: TopologyStore) -> None:
    with pytest.raises(RouterError) as info:
        resolve(parse_model("tiny-llama#shared"), store)
    assert info.value.status == 400
    assert info.value.code == "ambiguous_deployment"
    assert "accounts/team-a/deployments/shared" in info.value.message
    # A key scoped to one namespace disambiguates; qualified names always do.
    res = resolve(parse_model("tiny-llama#shared"), store, visible=lambda ns, name: ns == "team-b")
    assert res.key == ("team-b", "shared")
    assert resolve(parse_model("tiny-llama#accounts/team-a/deployments/shared"), store).key == ("team-a", "shared")


def test_legacy_deployed_model(store: TopologyStore) -> None:
    res = resolve(parse_model("support-bot", "llama-multi"), store, legacy=True)
    assert res.legacy
    assert res.addon == "support-bot"
    assert res.canonical == "support-bot#llama-multi"
    res = resolve(parse_model("support-bot", "accounts/default/deployments/llama-multi"), store, legacy=True)
    assert res.canonical == "support-bot#accounts/default/deployments/llama-multi"


def test_model_ids(store: TopologyStore) -> None:
    multi = store.get("default", "llama-multi")
    merged = store.get("default", "support-bot-merged")
    assert multi is not None
    assert merged is not None
    assert model_ids(multi) == [("Llama-3.1-8B-Instruct#llama-multi", None), ("support-bot#llama-multi", "support-bot")]
    assert model_ids(merged) == [("support-bot-merged", None), ("support-bot-merged#support-bot-merged", None)]


def pool_store() -> TopologyStore:
    s = TopologyStore()
    deployments = []
    addons = []
    for ns in ("team-a", "team-b"):
        pool = deployment("serverless-tiny-abc123", ns=ns)
        pool["metadata"]["labels"] = {"serving.loraserve.dev/serverless-pool": "true"}
        deployments.append(pool)
        haiku = addon("haiku" if ns == "team-a" else "shared", "", [("haiku-v1", 100)], ns=ns)
        haiku["status"] = {"deployment": "serverless-tiny-abc123"}
        twin = addon("twin", "", [("haiku-v1", 100)], ns=ns)
        twin["status"] = {"deployment": "serverless-tiny-abc123"}
        addons += [haiku, twin]
    deployments.append(deployment("own", ns="team-a"))
    addons.append(addon("dedicated", "own", [("haiku-v1", 100)], ns="team-a"))
    versions = [model_version("haiku-v1", "v1", ns=ns) for ns in ("team-a", "team-b")]
    s.replace(build_deployments(deployments, addons, versions, []))
    return s


def test_a_serverless_addon_is_called_by_its_own_name() -> None:
    s = pool_store()
    for model in ("haiku", "accounts/team-a/models/haiku"):
        res = resolve(parse_model(model), s)
        where = (res.deployment.namespace, res.deployment.name, res.addon)
        assert where == ("team-a", "serverless-tiny-abc123", "haiku")
        assert [v.served_name for v in res.versions] == ["haiku-v1"]
        assert res.canonical == model
    res = resolve(parse_model("accounts/team-b/models/twin"), s)
    assert res.deployment.namespace == "team-b"


def test_bare_names_that_are_not_serverless_addons_are_refused_clearly() -> None:
    s = pool_store()
    with pytest.raises(RouterError) as err:
        resolve(parse_model("twin"), s)  # seated in two namespaces' pools
    assert err.value.status == 400
    assert "accounts/team-a/models/twin" in err.value.message
    res = resolve(parse_model("twin"), s, visible=lambda ns, name: ns == "team-b")
    assert res.deployment.namespace == "team-b"
    for model in ("dedicated", "accounts/team-a/models/dedicated", "accounts/team-b/models/haiku"):
        with pytest.raises(RouterError) as err:
            resolve(parse_model(model), s)  # an addon with a Deployment of its own needs `#<deployment>`
        assert err.value.status == 404
