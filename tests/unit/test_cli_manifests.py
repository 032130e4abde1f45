"""The CLI without a cluster: arguments -> CRs (pure builders, checked with the API models), refusals shown as
`field: message`, traffic and rollback resolution, what `--wait` decides, and the command line itself
(`--dry-run`, exit codes, the operator's flags as the Helm chart renders them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraserve.cli import manifests as m
from loraserve.cli import views
from loraserve.cli.commands import ExitCode
from loraserve.cli.main import main
from loraserve.digest import directory_digest

BASE = "hf://meta-llama/Llama-3.1-8B-Instruct"


# -- references and names ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE, m.ModelRef(base_model=BASE)),
        ("file:///models/tiny", m.ModelRef(base_model="file:///models/tiny")),
        ("support-bot-v2", m.ModelRef(model_version="support-bot-v2")),
        ("accounts/team-a/models/support-bot-v2", m.ModelRef(model_version="support-bot-v2", namespace="team-a")),
    ],
)
def test_parse_model(text: str, expected: m.ModelRef) -> None:
    assert m.parse_model(text) == expected


@pytest.mark.parametrize("text", ["meta-llama/Llama-3.1-8B", "Support_Bot", "accounts/x/deployments/y"])
def test_parse_model_refuses_what_is_neither_uri_nor_version(text: str) -> None:
    with pytest.raises(m.Refused, match="MODEL: "):
        m.parse_model(text)


def test_deployment_refs_and_namespaces() -> None:
    assert m.parse_deployment_ref("llama") == (None, "llama")
    assert m.parse_deployment_ref("accounts/team-a/deployments/llama") == ("team-a", "llama")
    assert m.one_namespace(None, "team-a", "team-a") == "team-a"
    assert m.one_namespace(None, None) is None
    with pytest.raises(m.Refused, match="different namespaces: a, b"):
        m.one_namespace("a", "b")


def test_default_names() -> None:
    assert m.default_deployment_id(m.ModelRef(base_model=BASE)) == "llama-3-1-8b-instruct"
    assert m.default_deployment_id(m.ModelRef(base_model="s3://bucket/7b-chat/")) == "m-7b-chat"
    assert m.default_deployment_id(m.ModelRef(model_version="support-bot-v2")) == "support-bot-v2"
    assert len(m.default_deployment_id(m.ModelRef(base_model="hf://o/" + "x" * 80))) == 40
    assert m.default_addon_name("support-bot-v12") == "support-bot"
    assert m.default_addon_name("poet") == "poet"
    assert m.version_from_name("support-bot-v3") == "v3"
    assert m.version_from_name("support-bot") is None


# -- builders ----------------------------------------------------------------------------------------------
def test_deployment_manifest_writes_only_what_was_given() -> None:
    doc = m.deployment_manifest("llama", None, m.ModelRef(base_model=BASE), m.DeploymentOptions())
    assert doc == {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": "llama"},
        "spec": {"baseModel": BASE},
    }


def test_deployment_manifest_every_flag() -> None:
    options = m.DeploymentOptions(
        enable_addons=True,
        min_replicas=1,
        max_replicas=4,
        scale_up_window="1m",
        scale_down_window="15m",
        scale_to_zero_window="2h",
        accelerator_type="NVIDIA_H100_80GB",
        accelerator_count=4,
        long_prompt=True,
        region="us-east-1",
        max_loras=8,
        max_lora_rank=64,
        credentials_secret="hf-token",
        extra_args=("--max-model-len=4096",),
        tolerations=("gpu=a100:NoSchedule", "dedicated", "spot:NoExecute"),
    )
    doc = m.deployment_manifest("llama", "team-a", m.ModelRef(base_model=BASE), options)
    assert doc["metadata"] == {"name": "llama", "namespace": "team-a"}
    assert doc["spec"] == {
        "baseModel": BASE,
        "enableAddons": True,
        "minReplicas": 1,
        "maxReplicas": 4,
        "scaleUpWindow": "1m",
        "scaleDownWindow": "15m",
        "scaleToZeroWindow": "2h",
        "acceleratorType": "NVIDIA_H100_80GB",
        "acceleratorCount": 4,
        "longPrompt": True,
        "region": "us-east-1",
        "maxLoras": 8,
        "maxLoraRank": 64,
        "credentialsSecret": "hf-token",
        "extraArgs": ["--max-model-len=4096"],
        "tolerations": [
            {"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"},
            {"key": "dedicated", "operator": "Exists"},
            {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
        ],
    }


def test_live_merge_manifest() -> None:
    doc = m.deployment_manifest("merged", None, m.ModelRef(model_version="support-bot-v2"), m.DeploymentOptions())
    assert doc["spec"] == {"modelVersion": "support-bot-v2"}


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (
            m.DeploymentOptions(min_replicas=3, max_replicas=1),
            "spec.maxReplicas: must be greater than or equal to minReplicas",
        ),
        (m.DeploymentOptions(scale_to_zero_window="1m"), "spec.scaleToZeroWindow: must be at least 5m"),
        (
            m.DeploymentOptions(scale_up_window="1d"),
            'spec.scaleUpWindow: "1d" is not a Go duration (units ns, us, ms, s, m, h: e.g. 30s, 10m, 1h30m)',
        ),
        (m.DeploymentOptions(accelerator_count=3), "spec.acceleratorCount: Input should be 1, 2, 4 or 8"),
        (m.DeploymentOptions(max_loras=4), "spec.maxLoras: only applies with enableAddons"),
        (
            m.DeploymentOptions(long_prompt=True, accelerator_count=1),
            "spec.acceleratorCount: longPrompt needs acceleratorCount of at least 2",
        ),
        (m.DeploymentOptions(extra_args=("--port=1",)), "spec.extraArgs: --port is set by the operator"),
    ],
)
def test_deployment_refusals_name_the_field(options: m.DeploymentOptions, line: str) -> None:
    with pytest.raises(m.Refused) as refused:
        m.deployment_manifest("llama", None, m.ModelRef(base_model=BASE), options)
    assert refused.value.lines == [line]


@pytest.mark.parametrize("name", ["Llama", "1llama", "llama_3", "x" * 41])
def test_deployment_names_are_dns_labels(name: str) -> None:
    with pytest.raises(m.Refused, match=r"^metadata\.name: "):
        m.deployment_manifest(name, None, m.ModelRef(base_model=BASE), m.DeploymentOptions())


def test_bad_toleration_refused() -> None:
    with pytest.raises(m.Refused, match=r"spec\.tolerations: 'gpu:Never'"):
        m.parse_toleration("gpu:Never")


def test_deployment_patch_checks_the_merged_spec() -> None:
    live = {"metadata": {"name": "llama"}, "spec": {"baseModel": BASE, "minReplicas": 2, "replicas": 2}}
    assert m.deployment_patch(live, m.DeploymentOptions(max_replicas=4)) == {"spec": {"maxReplicas": 4}}
    with pytest.raises(m.Refused) as refused:
        m.deployment_patch(live, m.DeploymentOptions(max_replicas=1))
    assert refused.value.lines == ["spec.maxReplicas: must be greater than or equal to minReplicas"]
    with pytest.raises(m.Refused, match="nothing to update"):
        m.deployment_patch(live, m.DeploymentOptions())


def test_model_version_manifest() -> None:
    digest = "sha256:" + "a" * 64
    doc = m.model_version_manifest(
        "poet-v2",
        None,
        version=None,
        base_model="file:///models/tiny",
        base_revision=None,
        adapter_uri="file:///adapters/poet",
        digest=digest,
        rank=8,
        system_prompt="Rhyme.",
    )
    assert doc["spec"] == {
        "version": "v2",
        "baseModel": {"name": "file:///models/tiny", "revision": "local"},
        "adapter": {"uri": "file:///adapters/poet", "digest": digest, "rank": 8},
        "systemPrompt": "Rhyme.",
    }
    with pytest.raises(m.Refused, match=r"spec\.version: 'poet' does not end in -v<N>"):
        m.model_version_manifest(
            "poet",
            None,
            version=None,
            base_model=BASE,
            base_revision="abc",
            adapter_uri="s3://b/p",
            digest=None,
            rank=None,
        )
    with pytest.raises(m.Refused, match=r"spec\.baseModel\.revision: give --base-revision"):
        m.model_version_manifest(
            "poet-v1",
            None,
            version=None,
            base_model=BASE,
            base_revision=None,
            adapter_uri="s3://b/p",
            digest=None,
            rank=None,
        )


def test_addon_manifest() -> None:
    assert m.addon_manifest("poet", None, "poet-v1", "trial")["spec"] == {
        "deployment": "trial",
        "targets": [{"modelVersion": "poet-v1", "weight": 100}],
    }
    assert m.addon_manifest("poet", "ns", "poet-v1", None)["spec"] == {
        "targets": [{"modelVersion": "poet-v1", "weight": 100}]
    }


# -- traffic and rollback ----------------------------------------------------------------------------------
VERSIONS: dict[str, dict[str, Any]] = {
    "poet-v1": {"version": "v1", "baseModel": {"name": "file:///tiny"}},
    "poet-v2": {"version": "v2", "baseModel": {"name": "file:///tiny"}},
    "poet-v3": {"version": "v3", "baseModel": {"name": "file:///tiny"}},
    "chef-v1": {"version": "v1", "baseModel": {"name": "file:///tiny"}},
    "other-v3": {"version": "v3", "baseModel": {"name": BASE}},
}
ADDON = {
    "metadata": {"name": "poet"},
    "spec": {"deployment": "trial", "targets": [{"modelVersion": "poet-v2", "weight": 100}]},
}


def test_parse_traffic() -> None:
    assert m.parse_traffic(["v3=90", "v2=10"]) == [("v3", 90), ("v2", 10)]
    for bad in (["v3"], ["=10"], ["v3=x"], []):
        with pytest.raises(m.Refused, match=r"^spec\.targets: "):
            m.parse_traffic(bad)


def test_versions_resolve_within_the_addons_family() -> None:
    patch = m.traffic_patch(ADDON, [("v3", 90), ("v2", 10)], VERSIONS)
    assert patch == {
        "spec": {"targets": [{"modelVersion": "poet-v3", "weight": 90}, {"modelVersion": "poet-v2", "weight": 10}]}
    }
    # A ModelVersion's own name always works; a label unique in the namespace too.
    assert m.resolve_version("chef-v1", "poet", ["poet-v2"], VERSIONS) == "chef-v1"
    assert m.resolve_version("v2", "x", [], VERSIONS) == "poet-v2"
    # Outside any family, the base model of the current targets decides.
    assert m.resolve_version("v3", "x", ["chef-v1"], VERSIONS) == "poet-v3"


def test_traffic_refusals() -> None:
    with pytest.raises(m.Refused, match="weights must sum to 100"):
        m.traffic_patch(ADDON, [("v3", 90), ("v2", 20)], VERSIONS)
    with pytest.raises(m.Refused, match="no ModelVersion is named 'v9'"):
        m.traffic_patch(ADDON, [("v9", 100)], VERSIONS)
    with pytest.raises(m.Refused, match=r"'v1' is ambiguous \(chef-v1, poet-v1\)"):
        m.resolve_version("v1", "x", [], VERSIONS)


def test_rollback_is_a_pointer_flip() -> None:
    assert m.rollback_patch(ADDON, "v1", VERSIONS) == {
        "spec": {"targets": [{"modelVersion": "poet-v1", "weight": 100}]}
    }


# -- admission refusals ------------------------------------------------------------------------------------
def test_admission_lines_keep_field_and_message_only() -> None:
    status = {
        "kind": "Status",
        "status": "Failure",
        "message": 'Deployment.serving.loraserve.dev "llama" is invalid: spec.region: Invalid value: "object": '
        "region is fixed at creation",
        "reason": "Invalid",
        "details": {
            "causes": [
                {
                    "reason": "FieldValueInvalid",
                    "message": 'Invalid value: "object": region is fixed at creation',
                    "field": "spec.region",
                },
                {"reason": "FieldValueInvalid", "message": "Invalid value: 3: must be ok", "field": "spec.x"},
                {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.targets"},
                # Kubernetes 1.36 words CEL refusals without the value.
                {"reason": "FieldValueInvalid", "message": "Invalid value: fixed", "field": "spec.y"},
            ]
        },
        "code": 422,
    }
    assert m.admission_lines(status) == [
        "spec.region: region is fixed at creation",
        "spec.x: must be ok",
        "spec.targets: Required value",
        "spec.y: fixed",
    ]
    assert m.admission_lines({"message": 'X "y" is invalid: spec: Forbidden: nope'}) == ["spec: Forbidden: nope"]


# -- what --wait decides -----------------------------------------------------------------------------------
def deployment_obj(state: str, generation: int = 1, observed: int = 1, **conditions: tuple[str, str, str]) -> Any:
    return {
        "kind": "Deployment",
        "metadata": {"name": "llama", "generation": generation},
        "spec": {"baseModel": BASE},
        "status": {
            "observedGeneration": observed,
            "state": state,
            "readyReplicas": 0,
            "desiredReplicas": 1,
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": msg} for t, (s, r, msg) in conditions.items()
            ],
        },
    }


def test_follow_done_when_ready_for_the_current_generation() -> None:
    stale = deployment_obj("READY", generation=2, observed=1, Ready=("True", "ReplicasReady", "1/1"))
    creating = deployment_obj("UPDATING", generation=2, observed=2, Ready=("False", "RollingOut", "0/1"))
    ready = deployment_obj("READY", generation=2, observed=2, Ready=("True", "ReplicasReady", "1/1"))
    seen: list[views.Observation] = []
    outcome, last = views.follow("llama", [None, stale, creating, creating, ready, stale], seen.append)
    assert outcome is views.Outcome.DONE
    assert last is not None
    assert last.state == "READY"
    assert [s.state for s in seen] == [None, "READY", "UPDATING", "READY"]  # one report per change
    assert not seen[1].done  # READY, but for the previous generation


def test_follow_a_moving_state_is_not_done_whatever_ready_says() -> None:
    # Two reconciles' partial status patches can meet: UPDATING beside the previous Ready=True.
    mixed = deployment_obj("UPDATING", Ready=("True", "ReplicasReady", "2/2"))
    ready = deployment_obj("READY", Ready=("True", "ReplicasReady", "2/2"))
    outcome, last = views.follow("llama", [mixed, ready], lambda _: None)
    assert outcome is views.Outcome.DONE
    assert last is not None
    assert last.state == "READY"


def test_follow_scaled_to_zero_is_ready() -> None:
    zero = deployment_obj("SCALED_TO_ZERO", Ready=("True", "ScaledToZero", "scaled to zero"))
    assert views.follow("llama", [zero], lambda _: None)[0] is views.Outcome.DONE


def test_follow_failed_with_the_stalled_reason() -> None:
    message = "GPUStockout: 0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
    stalled = deployment_obj(
        "FAILED", Ready=("False", "GPUStockout", message), Stalled=("True", "GPUStockout", message)
    )
    outcome, last = views.follow("llama", [stalled], lambda _: None)
    assert outcome is views.Outcome.FAILED
    assert last is not None
    assert last.line() == f"llama: FAILED · 0/1 ready · {message}"  # the message names its reason already


def test_follow_times_out_when_the_stream_ends() -> None:
    creating = deployment_obj("CREATING", Ready=("False", "Creating", "0/1 replicas ready"))
    outcome, last = views.follow("llama", iter([creating]), lambda _: None)
    assert outcome is views.Outcome.TIMEOUT
    assert last is not None
    assert last.line() == "llama: CREATING · 0/1 ready"


def test_follow_until_gone() -> None:
    deleting = deployment_obj("DELETING")
    assert views.follow("llama", [deleting, None], lambda _: None, until_gone=True)[0] is views.Outcome.DONE


def test_names_to_call_and_rows() -> None:
    ready = deployment_obj("READY", Ready=("True", "ReplicasReady", "1/1"))
    assert views.deployment_model(ready) == "Llama-3.1-8B-Instruct#llama"
    assert views.deployment_model({"metadata": {"name": "merged"}, "spec": {"modelVersion": "bot-v2"}}) == "merged"
    addon = {"metadata": {"name": "poet"}, "spec": {"targets": []}, "status": {"deployment": "serverless-tiny-abc123"}}
    assert views.addon_model(addon) == "poet#serverless-tiny-abc123"
    assert views.addon_model({"metadata": {"name": "poet"}, "spec": {}}) is None
    assert views.deployment_row(ready) == ["llama", "READY", "0/1", "", "", "Llama-3.1-8B-Instruct#llama"]
    assert views.clean({"metadata": {"name": "x", "managedFields": []}}) == {"metadata": {"name": "x"}}


# -- the command line, without a cluster -------------------------------------------------------------------
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_the_cr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "create",
        "deployment",
        BASE,
        "--id",
        "llama",
        "--enable-addons",
        "--max-replica-count",
        "2",
        "--accelerator-type",
        "NVIDIA_H100_80GB",
        "-n",
        "team-a",
        "--dry-run",
    )
    assert code == ExitCode.OK
    assert yaml.safe_load(out) == {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": "llama", "namespace": "team-a"},
        "spec": {"baseModel": BASE, "enableAddons": True, "maxReplicas": 2, "acceleratorType": "NVIDIA_H100_80GB"},
    }
    code, out, _ = run(
        capsys, "-n", "team-a", "create", "lsd", "accounts/team-a/models/bot-v2", "--dry-run", "-o", "json"
    )
    assert code == ExitCode.OK
    assert json.loads(out)["spec"] == {"modelVersion": "bot-v2"}
    assert json.loads(out)["metadata"] == {"name": "bot-v2", "namespace": "team-a"}


def test_refusal_prints_field_and_message_only(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "create", "deployment", BASE, "--min-replica-count", "3", "--max-replica-count", "1", "--dry-run"
    )
    assert code == ExitCode.REFUSED == 3
    assert out == ""
    assert err == "spec.maxReplicas: must be greater than or equal to minReplicas\n"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "create", "deployment")[0] == ExitCode.USAGE
    assert run(capsys, "create", "deployment", BASE, "--wait", "--timeout", "1d")[0] == ExitCode.USAGE
    assert run(capsys, "create", "deployment", BASE, "--accelerator-type", "TPU")[0] == ExitCode.USAGE
    assert run(capsys, "frobnicate")[0] == ExitCode.USAGE
    assert run(capsys, "--help")[0] == ExitCode.OK
    assert run(capsys, "scale", "deployment", "x", "--replicas", "-1")[0] == ExitCode.USAGE


def test_namespaces_must_agree(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "-n", "a", "load-lora", "accounts/b/models/poet-v1", "--dry-run")
    assert code == ExitCode.REFUSED
    assert "different namespaces: a, b" in err


def test_create_model_version_from_a_local_adapter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    adapter = tmp_path / "poet"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    code, out, _ = run(
        capsys,
        "create",
        "model-version",
        "poet-v1",
        "--base",
        "file:///models/tiny",
        "--adapter",
        str(adapter),
        "--dry-run",
    )
    assert code == ExitCode.OK
    spec = yaml.safe_load(out)["spec"]
    assert spec["adapter"] == {"uri": adapter.resolve().as_uri(), "digest": directory_digest(adapter), "rank": 16}
    assert spec["version"] == "v1"
    code, _, err = run(
        capsys, "create", "mv", "poet-v2", "--base", BASE, "--adapter", str(tmp_path / "none"), "--base-revision", "x"
    )
    assert code == ExitCode.USAGE
    assert "--adapter: " in err


def test_load_lora_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "load-lora", "support-bot-v2", "--deployment", "llama", "--dry-run")
    assert code == ExitCode.OK
    doc = yaml.safe_load(out)
    assert doc["metadata"] == {"name": "support-bot"}
    assert doc["spec"] == {"deployment": "llama", "targets": [{"modelVersion": "support-bot-v2", "weight": 100}]}
    code, _, err = run(capsys, "load-lora", BASE, "--dry-run")
    assert code == ExitCode.REFUSED
    assert "load-lora loads a ModelVersion" in err


def test_no_cluster_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "list", "deployments", "--kubeconfig", str(tmp_path / "missing"))
    assert code == ExitCode.ERROR
    assert err.startswith("error: kubeconfig: ")


@pytest.fixture
def operator_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    import loraserve.operator_main

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(loraserve.operator_main, "run", lambda *args: calls.append(args))
    return calls


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # What the Helm chart renders (one --namespace per watched namespace).
        (
            [
                "operator",
                "--liveness=http://0.0.0.0:8080/healthz",
                "--metrics-port=0",
                "--namespace=a",
                "--namespace=b",
            ],
            (["a", "b"], False, "http://0.0.0.0:8080/healthz"),
        ),
        # What the tests and the local trial run.
        (["operator", "--standalone", "--verbose"], ([], True, None)),
        (["operator", "-n", "a", "-v"], (["a"], False, None)),
    ],
)
def test_operator_flags_unchanged(operator_calls: list[tuple[Any, ...]], argv: list[str], expected: Any) -> None:
    assert main(argv) == 0
    assert operator_calls == [expected]
