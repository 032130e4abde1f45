"""Building the routable view from custom resources and EndpointSlices; the store's replica state."""

from __future__ import annotations

from loraserve.router.topology import (
    DEFAULT_SCALE_FROM_ZERO_TIMEOUT,
    SCALE_FROM_ZERO_TIMEOUT_ANNOTATION,
    TopologyStore,
    build_deployments,
    loaded_adapters_from_models,
    parse_timeout_annotation,
    ready_endpoint_urls,
    split_url,
)
from tests.router.harness import addon, deployment, endpoint_slice, model_version


def test_build_from_resources_and_slices() -> None:
    views = build_deployments(
        [
            deployment("llama-multi", "hf://meta-llama/Llama-3.1-8B-Instruct", replicas=2),
            deployment("merged", model_version="bot-v2"),
            deployment("plain", "pvc://models/llama/", addons=False),
        ],
        [
            addon("bot", "llama-multi", [("bot-v1", 90), ("bot-v2", 10)]),
            addon("orphan", "", [("bot-v1", 100)]),
            addon("on-plain", "plain", [("bot-v1", 100)]),
        ],
        [model_version("bot-v1", "v1"), model_version("bot-v2", "v2")],
        [endpoint_slice("llama-multi", ["10.1.0.5", "10.1.0.4"]), endpoint_slice("merged", ["10.1.0.9"], ready=False)],
    )
    multi = views[("default", "llama-multi")]
    assert multi.base_model == "Llama-3.1-8B-Instruct"
    assert not multi.live_merge
    assert [(v.served_name, v.version, v.weight) for v in multi.addons["bot"]] == [
        ("bot-v1", "v1", 90),
        ("bot-v2", "v2", 10),
    ]
    assert multi.replica_urls == ("http://10.1.0.4:8000", "http://10.1.0.5:8000")
    assert multi.desired_replicas == 2
    merged = views[("default", "merged")]
    assert merged.live_merge
    assert merged.base_model == "merged"
    assert merged.replica_urls == ()
    plain = views[("default", "plain")]
    assert plain.base_model == "llama"
    assert plain.addons == {}


def test_addon_target_without_model_version_is_left_out() -> None:
    views = build_deployments(
        [deployment("d")], [addon("bot", "d", [("bot-v1", 50), ("bot-v9", 50)])], [model_version("bot-v1", "v1")], []
    )
    assert [v.served_name for v in views[("default", "d")].addons["bot"]] == ["bot-v1"]


def test_serverless_addon_is_served_by_the_pool_the_operator_seated_it_in() -> None:
    seated = addon("haiku", "", [("bot-v1", 100)])
    seated["status"] = {"deployment": "serverless-pool"}  # the operator's decision lives in status
    unseated = addon("later", "", [("bot-v1", 100)])
    views = build_deployments([deployment("serverless-pool")], [seated, unseated], [model_version("bot-v1", "v1")], [])
    assert list(views[("default", "serverless-pool")].addons) == ["haiku"]


def test_endpoint_conditions_and_ports() -> None:
    sl = endpoint_slice("d", ["10.0.0.1"], ready=None)  # unknown readiness counts as ready
    sl["endpoints"].append({"addresses": ["10.0.0.2"], "conditions": {"ready": True, "terminating": True}})
    sl["endpoints"].append({"addresses": ["fd00::7"], "conditions": {"ready": True}})
    assert ready_endpoint_urls([sl]) == ("http://10.0.0.1:8000", "http://[fd00::7]:8000")
    assert split_url("http://[fd00::7]:8000") == ("fd00::7", 8000)
    assert split_url("http://10.0.0.1:8000") == ("10.0.0.1", 8000)


def test_timeout_annotation() -> None:
    assert parse_timeout_annotation(None) == DEFAULT_SCALE_FROM_ZERO_TIMEOUT == 600.0
    assert parse_timeout_annotation({SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "2m30s"}) == 150.0
    assert parse_timeout_annotation({SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "1.5h"}) == 5400.0
    assert parse_timeout_annotation({SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "300ms"}) == 0.3
    for bad in ("1d", "5 minutes", "-1m", "0", "", "1h 30m"):
        assert parse_timeout_annotation({SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: bad}) == 600.0, bad
    views = build_deployments([deployment("d", annotations={SCALE_FROM_ZERO_TIMEOUT_ANNOTATION: "45s"})], [], [], [])
    assert views[("default", "d")].scale_from_zero_timeout == 45.0


def test_loaded_adapters_from_vllm_models() -> None:
    payload = {
        "object": "list",
        "data": [
            {"id": "tiny-llama", "parent": None},
            {"id": "bot-v1", "parent": "tiny-llama"},
            {"id": "bot-v2", "parent": "tiny-llama"},
        ],
    }
    assert loaded_adapters_from_models(payload) == frozenset({"bot-v1", "bot-v2"})
    assert loaded_adapters_from_models(payload, "other") == frozenset()
    assert loaded_adapters_from_models({"detail": "x"}) is None


def test_store_keeps_replica_state_across_updates() -> None:
    store = TopologyStore()
    heard: list[tuple[str, str]] = []
    store.add_listener(heard.append)
    new = store.replace(build_deployments([deployment("d")], [], [], [endpoint_slice("d", ["10.0.0.1"])]))
    assert [r.url for r in new] == ["http://10.0.0.1:8000"]
    replica = new[0]
    replica.in_flight = 3
    store.set_loaded(replica, frozenset({"bot-v1"}))
    assert heard == [("default", "d"), ("default", "d")]
    new = store.replace(build_deployments([deployment("d")], [], [], [endpoint_slice("d", ["10.0.0.1", "10.0.0.2"])]))
    assert [r.url for r in new] == ["http://10.0.0.2:8000"]
    state = store.get("default", "d")
    assert state is not None
    assert state.replicas["http://10.0.0.1:8000"] is replica
    assert replica.in_flight == 3
    assert replica.loaded == {"bot-v1"}
    store.set_loaded(replica, frozenset({"bot-v1"}))  # unchanged: no notification
    assert len(heard) == 3
    store.replace({})
    assert store.get("default", "d") is None
    assert heard[-1] == ("default", "d")


def test_the_deployment_of_an_addon() -> None:
    from loraserve.api.naming import addon_deployment

    assert addon_deployment({"spec": {"deployment": "d"}, "status": {"deployment": "d"}}) == "d"
    assert addon_deployment({"spec": {}, "status": {"deployment": "pool"}}) == "pool"
    assert addon_deployment({"spec": {"deployment": ""}}) is None


def test_routes_by_the_automatic_rollback_only_for_the_generation_it_fired_on() -> None:
    bot = addon("bot", "d", [("bot-v1", 90), ("bot-v2", 10)])
    bot["metadata"]["generation"] = 3
    bot["status"] = {
        "effectiveTargets": [{"modelVersion": "bot-v1", "weight": 100}, {"modelVersion": "bot-v2", "weight": 0}],
        "autoRollback": {"rolledBack": True, "generation": 3, "control": "bot-v1"},
    }
    mvs = [model_version("bot-v1", "v1"), model_version("bot-v2", "v2")]

    def weights() -> list[tuple[str, int]]:
        views = build_deployments([deployment("d")], [bot], mvs, [])
        return [(v.version, v.weight) for v in views[("default", "d")].addons["bot"]]

    assert weights() == [("v1", 100), ("v2", 0)]  # the spec still says 90/10: the operator never wrote it
    bot["metadata"]["generation"] = 4  # the user's next edit is routed by at once
    assert weights() == [("v1", 90), ("v2", 10)]
    bot["metadata"]["generation"] = 3
    bot["status"]["autoRollback"]["rolledBack"] = False
    assert weights() == [("v1", 90), ("v2", 10)]


def test_each_version_carries_its_system_prompt_and_the_addon_policy() -> None:
    bot = addon("bot", "d", [("bot-v1", 50), ("bot-v2", 50)])
    bot["spec"]["systemPromptPolicy"] = "replace"
    v1, v2 = model_version("bot-v1", "v1"), model_version("bot-v2", "v2")
    v1["spec"]["systemPrompt"] = "You are v1."
    views = build_deployments([deployment("d")], [bot], [v1, v2], [])
    versions = views[("default", "d")].addons["bot"]
    assert [(v.version, v.system_prompt, v.prompt_policy) for v in versions] == [
        ("v1", "You are v1.", "replace"),
        ("v2", None, "replace"),
    ]


def test_pool_deployments_are_marked_by_their_label() -> None:
    pool = deployment("serverless-x")
    pool["metadata"]["labels"] = {"serving.loraserve.dev/serverless-pool": "true"}
    views = build_deployments([pool, deployment("own")], [], [], [])
    assert views[("default", "serverless-x")].pool
    assert not views[("default", "own")].pool
