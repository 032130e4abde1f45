"""The SDK without a cluster: what `LLM(...)` would apply for each deployment type, the `model` it sends, and
its OpenAI calls reaching a real local HTTP server with that model filled in."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from loraserve.cli import manifests as m
from loraserve.sdk import LLM

BASE = "hf://meta-llama/Llama-3.1-8B-Instruct"


def test_on_demand_base() -> None:
    llm = LLM(BASE, "on-demand", id="llama", enable_addons=True, max_replicas=4, namespace="team-a")
    assert llm.kind is m.DEPLOYMENT
    assert llm.manifest == {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": "llama", "namespace": "team-a"},
        "spec": {"baseModel": BASE, "enableAddons": True, "maxReplicas": 4},
    }
    assert llm.router_model == "Llama-3.1-8B-Instruct#accounts/team-a/deployments/llama"


def test_on_demand_defaults_and_live_merge() -> None:
    assert LLM(BASE).id == "llama-3-1-8b-instruct"
    merged = LLM("support-bot-v2", id="bot", accelerator_type="NVIDIA_H100_80GB", long_prompt=True, namespace="ns")
    assert merged.manifest["spec"] == {
        "modelVersion": "support-bot-v2",
        "acceleratorType": "NVIDIA_H100_80GB",
        "longPrompt": True,
    }
    assert merged.router_model == "accounts/ns/deployments/bot"  # a live-merge deployment by its own name


def test_on_demand_lora() -> None:
    llm = LLM("accounts/team-a/models/support-bot-v2", "on-demand-lora", base_id="llama")
    assert llm.kind is m.LORA_ADDON
    assert llm.id == "support-bot"
    assert llm.manifest["metadata"] == {"name": "support-bot", "namespace": "team-a"}
    assert llm.manifest["spec"] == {
        "deployment": "llama",
        "targets": [{"modelVersion": "support-bot-v2", "weight": 100}],
    }
    assert llm.router_model == "support-bot#accounts/team-a/deployments/llama"


def test_serverless() -> None:
    llm = LLM("support-bot-v2", "serverless", id="bot", namespace="ns")
    assert llm.manifest["spec"] == {"targets": [{"modelVersion": "support-bot-v2", "weight": 100}]}
    assert llm.deployment is None  # the operator seats it: status.deployment


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((BASE, "dedicated"), {}, "deployment_type"),
        ((BASE, "on-demand-lora"), {"base_id": "llama"}, "name its ModelVersion"),
        (("bot-v1", "on-demand-lora"), {}, "base_id: on-demand-lora needs"),
        (("bot-v1", "serverless"), {"base_id": "llama"}, "base_id: a serverless addon"),
        (("bot-v1", "on-demand-lora"), {"base_id": "llama", "min_replicas": 1}, "belong to the Deployment"),
        ((BASE,), {"base_id": "llama"}, "only for deployment_type='on-demand-lora'"),
        ((BASE,), {"min_replicas": 2, "max_replicas": 1}, "spec.maxReplicas: must be greater"),
        ((BASE,), {"scale_to_zero_window": "1d"}, "spec.scaleToZeroWindow"),
        (("accounts/a/models/bot-v1", "on-demand-lora"), {"base_id": "accounts/b/deployments/x"}, "namespaces"),
    ],
)
def test_invalid_llms_are_refused_before_any_call(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(*args, **kwargs)


def test_refusals_are_value_errors_with_field_lines() -> None:
    with pytest.raises(m.Refused) as refused:
        LLM(BASE, min_replicas=2, max_replicas=1)
    assert refused.value.lines == ["spec.maxReplicas: must be greater than or equal to minReplicas"]


class Recorder:
    """A real HTTP server standing in for the router: records each request body, answers like vLLM."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], str]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recorder.requests.append((self.path, body, self.headers.get("Authorization", "")))
                if self.path.endswith("/chat/completions"):
                    choice: dict[str, Any] = {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hello"},
                        "finish_reason": "stop",
                    }
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": "hello", "finish_reason": "stop", "logprobs": None}
                    obj = "text_completion"
                answer = {"id": "x", "object": obj, "created": 0, "model": body["model"], "choices": [choice]}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def router() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.server.shutdown()


def test_chat_and_completions_fill_in_the_model(router: Recorder) -> None:
    bot = LLM("support-bot-v2", "on-demand-lora", base_id="llama", namespace="ns", router_url=router.url, api_key="k1")
    reply = bot.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content == "hello"
    text = bot.completions.create(prompt="Once", max_tokens=4)
    assert text.choices[0].text == "hello"
    # An explicit model wins (e.g. one pinned adapter version).
    bot.completions.create(model="support-bot-v2#llama", prompt="Once", max_tokens=4)
    assert [(path, body["model"], auth) for path, body, auth in router.requests] == [
        ("/v1/chat/completions", "support-bot#accounts/ns/deployments/llama", "Bearer k1"),
        ("/v1/completions", "support-bot#accounts/ns/deployments/llama", "Bearer k1"),
        ("/v1/completions", "support-bot-v2#llama", "Bearer k1"),
    ]
    assert router.requests[0][1]["messages"] == [{"role": "user", "content": "Hi"}]


def test_router_url_from_the_environment(router: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_ROUTER_URL", router.url + "/v1/")
    monkeypatch.delenv("LORASERVE_API_KEY", raising=False)
    LLM(BASE, id="llama", namespace="ns").completions.create(prompt="x", max_tokens=1)
    path, body, auth = router.requests[0]
    assert (path, auth) == ("/v1/completions", "Bearer none")
    assert body["model"] == "Llama-3.1-8B-Instruct#accounts/ns/deployments/llama"


def test_no_router_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORASERVE_ROUTER_URL", raising=False)
    with pytest.raises(RuntimeError, match="router_url"):
        LLM(BASE, namespace="ns").chat.completions.create(messages=[])
