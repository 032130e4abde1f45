"""Every bad spec in the corpus is refused at admission by the real kube-apiserver (OpenAPI schema + CEL),
and the error names the offending field. The valid examples are accepted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from loraserve.local.cluster import LocalCluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CORPUS = sorted((Path(__file__).parent / "admission" / "invalid").glob("*.yaml"))


def test_corpus_is_large_and_covers_every_kind() -> None:
    kinds = {doc["kind"] for path in CORPUS for doc in yaml.safe_load_all(path.read_text())}
    assert len(CORPUS) >= 40
    assert kinds == {"Deployment", "LoraAddon", "ModelVersion"}


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_spec_is_refused_naming_the_field(cluster: LocalCluster, namespace: str, path: Path) -> None:
    text = path.read_text()
    expected = re.search(r"^# expect: (.+)$", text, re.MULTILINE)
    assert expected, f"{path.name} has no '# expect:' line"
    docs = list(yaml.safe_load_all(text))
    kind, name = docs[-1]["kind"], docs[-1]["metadata"]["name"]
    resource = f"{kind.lower()}s.serving.loraserve.dev"

    def stored() -> object:
        got = cluster.kubectl("get", resource, name, "-n", namespace, "-o", "yaml", check=False)
        if got.returncode != 0:
            return None
        spec = yaml.safe_load(got.stdout)["spec"]
        spec.pop("replicas", None)  # written by the operator (when one runs in the session), not by the user
        return spec

    # Every document but the last sets the scene (e.g. the original of an edit) and must be accepted.
    for doc in docs[:-1]:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    before = stored()
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(docs[-1]), check=False)
    assert result.returncode != 0, f"{path.name} was accepted:\n{result.stdout}"
    field = expected.group(1)
    assert field in result.stderr, f"{path.name}: error does not name {field!r}:\n{result.stderr}"
    # The refused request changed nothing: no object created, no edit stored.
    assert stored() == before


def test_examples_are_accepted(cluster: LocalCluster, namespace: str) -> None:
    result = cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples"))
    assert result.stdout.count("created") == 5, result.stdout
    listed = cluster.kubectl("get", "loraserve", "-n", namespace, "-o", "name").stdout.split()
    assert len(listed) == 5


def test_defaults_are_applied_by_the_apiserver(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "live-merge-deployment.yaml"))
    spec = yaml.safe_load(cluster.kubectl("get", "lsd", "support-bot-merged", "-n", namespace, "-o", "yaml").stdout)[
        "spec"
    ]
    assert spec["scaleUpWindow"] == "30s"
    assert spec["scaleDownWindow"] == "10m"
    assert spec["scaleToZeroWindow"] == "1h"
    assert spec["enableAddons"] is False


def test_kubectl_explain_shows_descriptions(cluster: LocalCluster) -> None:
    out = cluster.kubectl("explain", "deployments.serving.loraserve.dev.spec.scaleToZeroWindow").stdout
    assert "at least 5m" in out
