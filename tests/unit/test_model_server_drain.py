"""A model server going away: the rendered pod drains before vLLM is stopped (preStop), with a grace period
that covers the drain; the drain program waits for the router to notice, then for vLLM's own requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from loraserve.api.deployment import DeploymentSpec
from loraserve.fetcher import drain, main
from loraserve.local.runtime import local_command
from loraserve.resources.model_server import build_deployment
from loraserve.resources.settings import ManifestSettings

BASE = "hf://meta-llama/Llama-3.1-8B-Instruct"


def pod(settings: ManifestSettings, **spec: Any) -> dict[str, Any]:
    body = DeploymentSpec.model_validate({"baseModel": BASE, "enableAddons": True, **spec})
    result: dict[str, Any] = build_deployment("d", "ns", "uid", body, settings)["spec"]["template"]["spec"]
    return result


def test_vllm_drains_before_it_is_stopped_within_the_grace_period() -> None:
    settings = ManifestSettings.from_env({"LORASERVE_DRAIN_SECONDS": "300"})
    spec = pod(settings)
    vllm = next(c for c in spec["containers"] if c["name"] == "vllm")
    command = vllm["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["loraserve-fetch", "drain"]
    assert "--timeout=300" in command
    assert "--port=8000" in command
    # The kubelet kills at the end of the grace period whatever preStop is doing: the drain must fit in it,
    # with room left for vLLM's own shutdown after SIGTERM.
    assert spec["terminationGracePeriodSeconds"] >= settings.drain_settle_seconds + 300 + 10
    # The model-server image runs the drain program (the local runtime maps it the same way).
    assert local_command({"command": command}, None) is not None
    with pytest.raises(ValueError, match="LORASERVE_DRAIN_SECONDS"):
        ManifestSettings.from_env({"LORASERVE_DRAIN_SECONDS": "soon"})


def test_fetcher_settings_reach_the_fetch_containers_only() -> None:
    env = {"LORASERVE_FETCH_ALLOW_HOSTS": "registry.internal", "LORASERVE_FETCH_MAX_FILE_BYTES": "1000"}
    spec = pod(ManifestSettings.from_env(env))
    fetcher = next(c for c in spec["containers"] if c["name"] == "adapter-fetcher")
    init = next(c for c in spec["initContainers"] if c["name"] == "fetch-base-model")
    vllm = next(c for c in spec["containers"] if c["name"] == "vllm")
    for c in (fetcher, init):
        got = {e["name"]: e.get("value") for e in c["env"]}
        assert got["LORASERVE_FETCH_ALLOW_HOSTS"] == "registry.internal"
        assert got["LORASERVE_FETCH_MAX_FILE_BYTES"] == "1000"
    assert not any(e["name"].startswith("LORASERVE_FETCH_") for e in vllm["env"])


class FakeVllm:
    """vLLM's /metrics, with a number of requests in progress the test controls."""

    def __init__(self) -> None:
        self.running = 2
        self.scrapes = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.scrapes += 1
                text = (
                    f'vllm:num_requests_running{{model_name="m"}} {outer.running}\n'
                    f'vllm:num_requests_waiting{{model_name="m"}} 0\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def vllm() -> Iterator[FakeVllm]:
    fake = FakeVllm()
    yield fake
    fake.server.shutdown()


class FakeTime:
    def __init__(self, on_sleep: Any = None) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.on_sleep = on_sleep

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep()

    def clock(self) -> float:
        return self.now


def test_drain_waits_for_the_router_then_for_requests_in_progress(vllm: FakeVllm) -> None:
    def finish_one() -> None:
        if vllm.scrapes:  # after the settle pause, one request finishes per second
            vllm.running = max(0, vllm.running - 1)

    fake = FakeTime(finish_one)
    assert drain(vllm.url, settle=5, timeout=60, sleep=fake.sleep, clock=fake.clock).startswith("drained")
    assert fake.slept[0] == 5  # first the router's turn: the replica still serves what it is sent
    assert vllm.running == 0
    assert vllm.scrapes == 3  # 2 requests left -> 1 -> 0


def test_drain_is_bounded_and_ends_when_vllm_is_gone(vllm: FakeVllm) -> None:
    fake = FakeTime()
    vllm.running = 7  # never finishes
    assert drain(vllm.url, settle=1, timeout=30, sleep=fake.sleep, clock=fake.clock).startswith("gave up")
    assert 30 <= fake.now <= 33
    vllm.server.shutdown()
    vllm.server.server_close()
    assert "not answering" in drain(vllm.url, settle=0, timeout=30, sleep=FakeTime().sleep)
    assert main(["drain", "--port=1", "--settle=0", "--timeout=1"]) == 0  # preStop never fails the pod's exit
