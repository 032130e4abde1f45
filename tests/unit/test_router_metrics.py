"""The router's metrics: names, labels, histogram buckets, as Prometheus scrapes them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from loraserve.router.metrics import METRIC_NAMES, RouterMetrics


def scrape(m: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_series_render() -> None:
    m = RouterMetrics()
    s = m.series("ns", "d", "bot", "v1")
    other = m.series("ns", "d", "bot", "v2")  # another version of the same addon
    other.in_flight += 1
    other.finished(500)
    s.in_flight += 2
    s.finished(200)
    s.finished(200)
    s.finished(503)
    s.ttft.observe(0.007)
    s.ttft.observe(700.0)
    s.output_tokens += 16
    s.held += 1
    s.holds += 1
    s.accepted()
    m.reject(401)
    m.wake("ns", "d")
    samples = scrape(m)
    labels = (("addon", "bot"), ("deployment", "d"), ("namespace", "ns"))
    # Load gauges are per addon (versions summed); requests and latencies are per version.
    assert samples[("loraserve_router_requests_in_flight", labels)] == 3
    v1 = (*labels, ("version", "v1"))
    v2 = (*labels, ("version", "v2"))
    assert samples[("loraserve_router_requests_total", (*labels[:1], ("code", "200"), *v1[1:]))] == 2
    assert samples[("loraserve_router_requests_total", (*labels[:1], ("code", "503"), *v1[1:]))] == 1
    assert samples[("loraserve_router_requests_total", (*labels[:1], ("code", "500"), *v2[1:]))] == 1
    assert ("loraserve_router_requests_total", (*labels[:1], ("code", "200"), *v2[1:])) not in samples
    assert samples[("loraserve_router_rejected_requests_total", (("code", "401"),))] == 1
    assert samples[("loraserve_router_wakeups_total", (("deployment", "d"), ("namespace", "ns")))] == 1
    assert samples[("loraserve_router_output_tokens_total", labels)] == 16
    assert samples[("loraserve_router_requests_held", labels)] == 1
    assert samples[("loraserve_router_last_request_timestamp_seconds", labels)] > 0

    def bucket(le: str) -> float:
        key = ("loraserve_router_time_to_first_token_seconds_bucket", tuple(sorted((*v1, ("le", le)))))
        return samples[key]

    assert bucket("0.005") == 0
    assert bucket("0.01") == 1
    assert bucket("600.0") == 1
    assert bucket("+Inf") == 2
    assert samples[("loraserve_router_time_to_first_token_seconds_count", v1)] == 2
    assert samples[("loraserve_router_time_to_first_token_seconds_sum", v1)] == 700.007


def test_every_metric_is_exposed_once_a_series_exists() -> None:
    m = RouterMetrics()
    m.series("ns", "d", None)
    text = m.render().decode()
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
