"""A live merge starts from the base its ModelVersion pins: an hf:// base is fetched at the pinned revision, a
sha256 revision is checked on the fetched files and again by the merge step, a name whose own @revision
disagrees with the pin is refused, and a merge refusal reaches the pod's termination message."""

from __future__ import annotations

from typing import Any

import pytest

from loraserve.api.deployment import DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.merge import MergeRefused
from loraserve.merge.pin import PinnedBase, pinned_base
from loraserve.resources.model_server import build_deployment
from loraserve.resources.settings import ManifestSettings

COMMIT = "0e9e39f249a16976918f6564b8830bc894c89659"
DIGEST = "sha256:" + "ab" * 32


def test_hf_base_is_fetched_at_the_pinned_revision() -> None:
    assert pinned_base("hf://meta-llama/Llama-3.1-8B", COMMIT) == PinnedBase(
        f"hf://meta-llama/Llama-3.1-8B@{COMMIT}", None
    )
    assert pinned_base(f"hf://org/m@{COMMIT}", COMMIT) == PinnedBase(f"hf://org/m@{COMMIT}", None)


def test_hf_name_pinning_another_revision_is_refused() -> None:
    with pytest.raises(MergeRefused, match=r"spec\.baseModel.*'main'.*revision is '0e9e39f"):
        pinned_base("hf://org/m@main", COMMIT)


@pytest.mark.parametrize("name", ["hf://org/m", "pvc://weights/llama", "s3://bucket/llama", "file:///models/tiny"])
def test_a_digest_revision_is_checked_whatever_the_source(name: str) -> None:
    assert pinned_base(name, DIGEST) == PinnedBase(name, DIGEST)


def test_a_label_revision_on_a_source_without_revisions_checks_nothing() -> None:
    assert pinned_base("pvc://weights/llama", "local") == PinnedBase("pvc://weights/llama", None)


def _merge_pod(base: str, revision: str) -> dict[str, Any]:
    version = ModelVersionSpec.model_validate(
        {"version": "v1", "baseModel": {"name": base, "revision": revision}, "adapter": {"uri": "s3://adapters/bot/v1"}}
    )
    spec = DeploymentSpec.model_validate({"modelVersion": "bot-v1"})
    deployment = build_deployment("bot", "team", "uid", spec, ManifestSettings(), version)
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["initContainers"]}


def test_merge_pod_fetches_the_pinned_commit() -> None:
    init = _merge_pod("hf://meta-llama/Llama-3.1-8B", COMMIT)
    assert f"--uri=hf://meta-llama/Llama-3.1-8B@{COMMIT}" in init["fetch-base-model"]["args"]
    assert not any(a.startswith("--base-digest") for a in init["merge-adapter"]["args"])
    assert init["merge-adapter"]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_merge_pod_checks_a_pinned_digest_on_fetch_and_on_merge() -> None:
    init = _merge_pod("s3://weights/llama", DIGEST)
    assert f"--digest={DIGEST}" in init["fetch-base-model"]["args"]
    assert f"--base-digest={DIGEST}" in init["merge-adapter"]["args"]
    claim = _merge_pod("pvc://weights/llama", DIGEST)  # read from the claim: only the merge step can check it
    assert f"--base-digest={DIGEST}" in claim["merge-adapter"]["args"]


def test_a_refused_merge_reaches_the_deployment_status() -> None:
    from loraserve.status import crash_looping

    message = "MergeFailed: adapter_config.json: use_dora on an embedding (...) is not merged\n"
    pod = {
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [
                {"name": "fetch-base-model", "state": {"terminated": {"exitCode": 0}}},
                {
                    "name": "merge-adapter",
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": message}},
                },
            ],
            "containerStatuses": [{"name": "vllm", "state": {"waiting": {"reason": "PodInitializing"}}}],
        }
    }
    found = crash_looping([pod])
    assert found is not None
    assert found.startswith("container merge-adapter: CrashLoopBackOff")
    assert "use_dora on an embedding" in found
