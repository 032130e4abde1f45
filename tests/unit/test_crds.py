"""The committed CRDs are exactly what the models render, and carry what kubectl users rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loraserve import crdgen


def _crds(repo_root: Path) -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in (repo_root / "crds").glob("*.yaml")}


def test_crds_are_not_stale(repo_root: Path) -> None:
    # crds/ and the Helm chart's copy both match the models.
    dirs = [str(repo_root / "crds"), str(repo_root / "charts" / "loraserve" / "crds")]
    assert crdgen.main(["--check", *dirs]) == 0, "run: python -m loraserve.crdgen"


def test_stale_file_is_detected(tmp_path: Path) -> None:
    assert crdgen.main([str(tmp_path)]) == 0
    victim = next(tmp_path.glob("*deployments.yaml"))
    victim.write_text(victim.read_text().replace("default: 30s", "default: 31s"))
    assert crdgen.main(["--check", str(tmp_path)]) == 1


def test_exactly_three_crds(repo_root: Path) -> None:
    crds = _crds(repo_root)
    kinds = sorted(c["spec"]["names"]["kind"] for c in crds.values())
    assert kinds == ["Deployment", "LoraAddon", "ModelVersion"]
    for crd in crds.values():
        spec = crd["spec"]
        assert spec["group"] == "serving.loraserve.dev"
        assert spec["scope"] == "Namespaced"
        assert spec["names"]["categories"] == ["loraserve"]
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1"
        assert "status" in version["subresources"]


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


def test_every_spec_field_is_described_and_typed(repo_root: Path) -> None:
    for crd in _crds(repo_root).values():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(root["properties"]["spec"], "spec"):
            assert "type" in node, f"{path} has no type"
            if "." in path and not path.endswith("[]") and not path.endswith("}"):
                assert node.get("description"), f"{path} has no description (kubectl explain)"


def test_deployment_scale_subresource_and_columns(repo_root: Path) -> None:
    crd = _crds(repo_root)["serving.loraserve.dev_deployments.yaml"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "State",
        "Ready",
        "Desired",
        "Accelerator",
        "Age",
    ]


def test_short_names_do_not_clash_with_builtins(repo_root: Path) -> None:
    builtin = {
        "deploy",
        "po",
        "svc",
        "cm",
        "ns",
        "no",
        "pv",
        "pvc",
        "sa",
        "rs",
        "ds",
        "sts",
        "ing",
        "hpa",
        "ep",
        "cs",
        "crd",
        "crds",
        "csr",
        "ev",
        "limits",
        "netpol",
        "pdb",
        "pc",
        "psp",
        "quota",
        "rc",
        "sc",
        "cj",
    }
    for crd in _crds(repo_root).values():
        assert not set(crd["spec"]["names"]["shortNames"]) & builtin


def test_cross_field_rules_are_in_the_schema(repo_root: Path) -> None:
    def rules(name: str) -> str:
        spec = _crds(repo_root)[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        return " ".join(r["rule"] for r in spec.get("x-kubernetes-validations", []))

    deployment = rules("serving.loraserve.dev_deployments.yaml")
    assert "self.maxReplicas >= self.minReplicas" in deployment
    window = _crds(repo_root)["serving.loraserve.dev_deployments.yaml"]["spec"]["versions"][0]["schema"]
    zero = window["openAPIV3Schema"]["properties"]["spec"]["properties"]["scaleToZeroWindow"]
    assert zero["x-kubernetes-validations"][0]["rule"] == "duration(self) >= duration('5m')"
    assert "AMD_MI300X_192GB" in deployment
    assert "self == oldSelf" in rules("serving.loraserve.dev_modelversions.yaml")
    assert "sum() == 100" in rules("serving.loraserve.dev_loraaddons.yaml")


def test_readme_field_tables_are_the_models() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "<!-- fields: Deployment -->" in readme
    assert crdgen.render_readme(readme) == readme, "run: python -m loraserve.crdgen"
    # A description written in the model is what the README shows.
    assert '| `scaleToZeroWindow` | `"1h"` | Go duration, at least 5m.' in readme
