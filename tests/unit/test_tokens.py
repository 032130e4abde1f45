"""Model-server tokens: derived per Deployment from the install key; the fetcher demands its token."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from loraserve.api.deployment import DeploymentSpec
from loraserve.fetcher import _app
from loraserve.resources.model_server import build_deployment, build_network_policy, build_service
from loraserve.resources.settings import ManifestSettings
from loraserve.tokens import ModelServerTokens, token_secret_name


def test_tokens_differ_per_deployment_and_key(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k" * 32 + "\n")
    tokens = ModelServerTokens.from_file(str(key))
    a, b = tokens.token("team", "a"), tokens.token("team", "b")
    assert a is not None
    assert b is not None
    assert a != b
    assert tokens.token("other", "a") != a  # namespaces are part of the identity
    assert ModelServerTokens(b"x" * 32).token("team", "a") != a
    assert tokens.authorization("team", "a") == {"Authorization": f"Bearer {a}"}
    assert tokens.header_line("team", "a") == f"authorization: Bearer {a}\r\n".encode()
    assert ModelServerTokens.from_file(None).authorization("team", "a") == {}
    key.write_text("short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ModelServerTokens.from_file(str(key))


def test_pods_read_the_token_from_the_secret_and_the_service_hides_the_fetcher() -> None:
    spec = DeploymentSpec.model_validate({"baseModel": "hf://org/m", "enableAddons": True})
    settings = ManifestSettings(model_server_auth=True, control_plane_namespace="loraserve-system")
    pod = build_deployment("d", "team", "uid", spec, settings)["spec"]["template"]["spec"]
    ref = {"secretKeyRef": {"name": token_secret_name("d"), "key": "token"}}
    vllm, fetcher = pod["containers"]
    assert {"name": "VLLM_API_KEY", "valueFrom": ref} in vllm["env"]
    assert {"name": "LORASERVE_MODEL_SERVER_TOKEN", "valueFrom": ref} in fetcher["env"]
    assert not any("token" in a.lower() or "api-key" in a for a in vllm["args"] + fetcher["args"])
    assert [p["port"] for p in build_service("d", "team", "uid", spec, settings)["spec"]["ports"]] == [8000]
    policy = build_network_policy("d", "team", "uid", settings)
    assert policy is not None
    peer = policy["spec"]["ingress"][0]["from"][0]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "loraserve-system"}
    without = build_deployment("d", "team", "uid", spec, ManifestSettings())["spec"]["template"]["spec"]
    assert not any(e["name"] == "VLLM_API_KEY" for e in without["containers"][0]["env"])


async def test_fetcher_refuses_requests_without_the_token(tmp_path: Path) -> None:
    async with TestClient(TestServer(_app(tmp_path, "s3cret"))) as client:
        assert (await client.get("/health")).status == 200  # probes need no token
        body = {"name": "a", "uri": "file:///nowhere"}
        assert (await client.post("/fetch", json=body)).status == 401
        assert (await client.post("/fetch", json=body, headers={"Authorization": "Bearer nope"})).status == 401
        assert (await client.delete("/adapters/a")).status == 401
        ok = await client.delete("/adapters/a", headers={"Authorization": "Bearer s3cret"})
        assert ok.status == 200


def test_operator_refuses_to_start_with_a_bad_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraserve import operator_main
    from loraserve.handlers.deployment import model_server_tokens

    key = tmp_path / "key"
    key.write_text("short")
    monkeypatch.setenv("LORASERVE_MODEL_SERVER_KEY_FILE", str(key))
    model_server_tokens.cache_clear()
    try:
        with pytest.raises(SystemExit, match="at least 16 bytes"):
            operator_main.run()
    finally:
        model_server_tokens.cache_clear()


def test_owned_secrets_are_written_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraserve import kube as kube_module

    writes: list[str] = []
    kube = kube_module.Kube(api=object())  # no API calls: the patch function is ours
    secret = {"kind": "Secret", "metadata": {"name": "t", "namespace": "ns"}}
    now = [1000.0]
    monkeypatch.setattr(kube_module.time, "monotonic", lambda: now[0])

    def call(method: str, path: str, *_: object, **__: object) -> SimpleNamespace:
        writes.append(f"{method} {path}")
        return SimpleNamespace(data=b"{}", release_conn=lambda: None)  # the undecoded answer

    monkeypatch.setattr(kube, "_call", call)
    assert kube.apply_secret(secret)
    assert not kube.apply_secret(secret)  # never read back: written once per period
    now[0] += kube_module.REAPPLY_SECONDS
    assert kube.apply_secret(secret)  # deleted by hand meanwhile? it comes back
    assert writes == ["PATCH /api/v1/namespaces/ns/secrets/t"] * 2
