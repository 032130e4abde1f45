"""The chart turns router auth on by default: a generated key (kept across upgrades, the router mounting only
its digest), explained by NOTES.txt; off only when asked, with a warning; your own keys when named."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraserve.local.cluster import LocalCluster, find_bin_dir
from loraserve.router.auth import KeyRing, parse_keys

pytestmark = pytest.mark.cluster
CHART = Path(__file__).resolve().parents[2] / "charts" / "loraserve"
# Pods stay Pending: these tests are about what the chart renders and keeps, not about running it.
PARKED = ["--set", "operator.nodeSelector.parked=yes", "--set", "router.nodeSelector.parked=yes"]


def helm(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(find_bin_dir() / "helm"), *args], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(*values: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(helm("template", "ls", str(CHART), "-n", "sys", *values)) if d]


def router_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ls-router")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def secret(cluster: LocalCluster, namespace: str, name: str) -> dict[str, str]:
    obj = json.loads(cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def test_router_requires_a_key_by_default_and_mounts_only_its_digest() -> None:
    docs = render()
    pod = router_pod(docs)
    assert "--api-keys-file=/etc/loraserve/keys/keys.yaml" in pod["containers"][0]["args"]
    keys_volume = next(v for v in pod["volumes"] if v["name"] == "keys")
    only_digests = [{"key": "keys.yaml", "path": "keys.yaml"}]
    assert keys_volume["secret"] == {"secretName": "ls-router-api-key", "items": only_digests}
    generated = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "ls-router-api-key")
    key = base64.b64decode(generated["data"]["key"]).decode()
    ring = KeyRing(parse_keys(base64.b64decode(generated["data"]["keys.yaml"]).decode()))
    found = ring.authenticate(f"Bearer {key}")
    assert found is not None
    assert found.namespaces is None  # every namespace the router serves
    assert ring.authenticate("Bearer " + key[:-1]) is None
    assert key not in base64.b64decode(generated["data"]["keys.yaml"]).decode()


def test_auth_off_only_when_asked_and_your_own_keys_replace_the_generated_one() -> None:
    off = render("--set", "router.auth.enabled=false")
    assert not any(a.startswith("--api-keys-file") for a in router_pod(off)["containers"][0]["args"])
    assert not any(d["kind"] == "Secret" and d["metadata"]["name"] == "ls-router-api-key" for d in off)
    mine = render("--set", "router.apiKeysSecret=team-keys")
    assert not any(d["kind"] == "Secret" and d["metadata"]["name"] == "ls-router-api-key" for d in mine)
    keys_volume = next(v for v in router_pod(mine)["volumes"] if v["name"] == "keys")
    assert keys_volume["secret"]["secretName"] == "team-keys"
    assert "--api-keys-file=/etc/loraserve/keys/keys.yaml" in router_pod(mine)["containers"][0]["args"]


def test_generated_key_survives_upgrades_and_notes_explain_it(cluster: LocalCluster, namespace: str) -> None:
    env = cluster.env()
    out = helm("install", "ls", str(CHART), "-n", namespace, *PARKED, env=env)
    assert f"kubectl get secret ls-router-api-key -n {namespace} -o jsonpath='{{.data.key}}' | base64 -d" in out
    assert "WARNING" not in out
    first = secret(cluster, namespace, "ls-router-api-key")
    assert KeyRing(parse_keys(first["keys.yaml"])).authenticate(f"Bearer {first['key']}") is not None

    helm("upgrade", "ls", str(CHART), "-n", namespace, *PARKED, env=env)
    assert secret(cluster, namespace, "ls-router-api-key") == first  # lookup keeps it

    # Rotation as NOTES.txt tells it: delete the Secret, upgrade; the old key is not in the new keys file.
    cluster.kubectl("delete", "secret", "ls-router-api-key", "-n", namespace)
    helm("upgrade", "ls", str(CHART), "-n", namespace, *PARKED, env=env)
    second = secret(cluster, namespace, "ls-router-api-key")
    ring = KeyRing(parse_keys(second["keys.yaml"]))
    assert second["key"] != first["key"]
    assert ring.authenticate(f"Bearer {second['key']}") is not None
    assert ring.authenticate(f"Bearer {first['key']}") is None

    off = helm("upgrade", "ls", str(CHART), "-n", namespace, *PARKED, "--set", "router.auth.enabled=false", env=env)
    assert "WARNING: router.auth.enabled=false" in off
    helm("uninstall", "ls", "-n", namespace, "--wait", env=env)
