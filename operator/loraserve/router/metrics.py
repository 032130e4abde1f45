"""The router's Prometheus metrics: the autoscaler's inputs (in-flight, held at zero, last request time).

Labels are `namespace`, `deployment`, `addon` ("" for the base model or a live-merge deployment), and on
the request counter and the TTFT / latency histograms also `version` (the adapter version that answered, e.g.
`v2`; "" for the base): the automatic rollback compares versions by them. Only
resolved, known deployments ever become label values, so a client cannot grow the series by sending
made-up names; requests refused before a deployment is known are counted in `rejected_requests_total` by
status code alone.

The hot path only bumps plain numbers on a per-(namespace, deployment, addon) `Series` (the router is one
event loop, so no locks); a custom collector turns them into Prometheus families when /metrics is scraped,
on a thread (it only reads them: a scrape may see a request's numbers half-updated, never torn ones).
This costs a twentieth of prometheus-client's labelled children per request (measured here: 11.5 µs -> 0.5 µs).

The operator reads the same numbers every autoscaler tick from `load()` (GET /load), compact JSON, not from
/metrics: the Prometheus text is some 4 KB per adapter version (two histograms), so at 10,000 addons that had
traffic it was 54 MB a scrape, 8 s of the router's CPU to render and 26 s of the operator's to parse
(bench/router_load_feed.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "loraserve_router_"
LABELS = ["namespace", "deployment", "addon"]
VERSION_LABELS = [*LABELS, "version"]

# Seconds. TTFT for LLMs: tens of ms to tens of s; end-to-end up to minutes (and holds up to 10 min).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

LOAD_FORMAT = 1  # of the body of GET /load

METRIC_NAMES = (
    "loraserve_router_requests_in_flight",
    "loraserve_router_requests_total",
    "loraserve_router_rejected_requests_total",
    "loraserve_router_time_to_first_token_seconds",
    "loraserve_router_request_duration_seconds",
    "loraserve_router_output_tokens_total",
    "loraserve_router_last_request_timestamp_seconds",
    "loraserve_router_requests_held",
    "loraserve_router_holds_total",
    "loraserve_router_hold_timeouts_total",
    "loraserve_router_wakeups_total",
    "loraserve_router_upstream_retries_total",
)


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            out.append((repr(float(bound)), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


class Series:
    """The numbers of one (namespace, deployment, addon, version)."""

    __slots__ = (
        "codes",
        "duration",
        "held",
        "hold_timeouts",
        "holds",
        "in_flight",
        "labels",
        "last_request",
        "output_tokens",
        "retries",
        "ttft",
    )

    def __init__(self, labels: tuple[str, str, str, str]) -> None:
        self.labels = labels
        self.in_flight = 0
        self.held = 0
        self.holds = 0
        self.hold_timeouts = 0
        self.retries = 0
        self.output_tokens = 0
        self.last_request = 0.0
        self.codes: dict[int, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.duration = Histogram(LATENCY_BUCKETS)

    def accepted(self) -> None:
        self.last_request = time.time()

    def finished(self, code: int) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


class RouterMetrics(Collector):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self._series: dict[tuple[str, str, str, str], Series] = {}
        self.rejected: dict[int, int] = {}
        self.wakeups: dict[tuple[str, str], int] = {}
        self._rendering = asyncio.Lock()
        self.registry.register(self)

    def series(self, namespace: str, deployment: str, addon: str | None, version: str | None = None) -> Series:
        labels = (namespace, deployment, addon or "", version or "")
        s = self._series.get(labels)
        if s is None:
            s = self._series[labels] = Series(labels)
        return s

    def reject(self, code: int) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1

    def wake(self, namespace: str, deployment: str) -> None:
        key = (namespace, deployment)
        self.wakeups[key] = self.wakeups.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_aside(self) -> bytes:
        """`render` on a thread, one at a time: the text is some 4 KB per adapter version (8 s of CPU for
        10,000 addons that had traffic), and on the event loop it held every request for as long."""
        async with self._rendering:
            return await asyncio.to_thread(self.render)

    async def load_aside(self, versions: bool = False) -> bytes:
        """`load` on a thread: 38 ms for 10,000 addons that had traffic (88 ms with versions), at every tick of
        the operator."""
        return await asyncio.to_thread(self.load, versions)

    def load(self, versions: bool = False) -> bytes:
        """GET /load, the operator's feed (format 1; loraserve.autoscale.signals reads it). Per addon ("" the
        base model): [namespace, deployment, addon, in flight, held, requests finished, last request time].
        With `versions` (GET /load?versions=1), per adapter version too: [namespace, deployment, addon, version,
        requests finished, of them 5xx, TTFT bucket counts, latency bucket counts], each count for its bucket
        alone, `buckets` giving the upper bounds (+Inf last, not listed)."""
        addons: dict[tuple[str, str, str], list[float]] = {}
        rows: list[list[Any]] = []
        for s in list(self._series.values()):  # copied at once: the event loop may add one meanwhile
            finished = sum(s.codes.values())
            numbers = addons.setdefault(s.labels[:3], [0, 0, 0, 0.0])
            numbers[0] += s.in_flight
            numbers[1] += s.held
            numbers[2] += finished
            numbers[3] = max(numbers[3], s.last_request)
            if versions and s.labels[3]:
                errors = sum(n for code, n in list(s.codes.items()) if code >= 500)
                rows.append([*s.labels, finished, errors, s.ttft.counts, s.duration.counts])
        body = {
            "format": LOAD_FORMAT,
            "buckets": {"ttft": TTFT_BUCKETS, "latency": LATENCY_BUCKETS},
            "addons": [[*labels, *numbers] for labels, numbers in addons.items()],
            "versions": rows,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def collect(self) -> Iterator[Metric]:
        series = [self._series[k] for k in sorted(self._series)]
        # Load signals stay per addon (the autoscaler's and dashboards' unit): versions are summed into them.
        by_addon: dict[tuple[str, ...], list[Series]] = {}
        for s in series:
            by_addon.setdefault(s.labels[:3], []).append(s)

        def gauge(name: str, doc: str, attr: str) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            for labels, group in by_addon.items():
                values = [getattr(s, attr) for s in group]
                fam.add_metric(list(labels), max(values) if attr == "last_request" else sum(values))
            return fam

        def counter(name: str, doc: str, attr: str) -> CounterMetricFamily:
            fam = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            for labels, group in by_addon.items():
                fam.add_metric(list(labels), sum(getattr(s, attr) for s in group))
            return fam

        def histogram(name: str, doc: str, attr: str) -> HistogramMetricFamily:
            fam = HistogramMetricFamily(PREFIX + name, doc, labels=VERSION_LABELS)
            for s in series:
                h: Histogram = getattr(s, attr)
                fam.add_metric(list(s.labels), h.cumulative(), h.sum)
            return fam

        yield gauge("requests_in_flight", "Requests accepted and not finished (held at zero included).", "in_flight")
        requests = CounterMetricFamily(
            PREFIX + "requests",
            "Requests finished, by HTTP status code (the replica's, the router's own, 499 client gone).",
            labels=[*VERSION_LABELS, "code"],
        )
        for s in series:
            for code in sorted(s.codes):
                requests.add_metric([*s.labels, str(code)], s.codes[code])
        yield requests
        rejected = CounterMetricFamily(
            PREFIX + "rejected_requests",
            "Requests refused before a deployment was known (bad body, auth, unknown model, too large).",
            labels=["code"],
        )
        for code in sorted(self.rejected):
            rejected.add_metric([str(code)], self.rejected[code])
        yield rejected
        yield histogram(
            "time_to_first_token_seconds",
            "Arrival to the first response body byte of a successful answer (the first SSE chunk when streaming).",
            "ttft",
        )
        yield histogram(
            "request_duration_seconds",
            "Arrival to the last response byte (end-to-end, time held at zero included).",
            "duration",
        )
        yield counter("output_tokens", "Completion tokens, from the response's usage when it has one.", "output_tokens")
        yield gauge(
            "last_request_timestamp_seconds",
            "Unix time of the last request accepted for the deployment/addon.",
            "last_request",
        )
        yield gauge(
            "requests_held",
            "Requests waiting for a ready replica (scale from zero, or an adapter not loaded yet).",
            "held",
        )
        yield counter("holds", "Requests that had to wait for a ready replica.", "holds")
        yield counter(
            "hold_timeouts", "Held requests answered 503 because no replica became ready in time.", "hold_timeouts"
        )
        wakeups = CounterMetricFamily(
            PREFIX + "wakeups", "Times the router asked a deployment at zero to scale up.", labels=LABELS[:2]
        )
        for key in sorted(self.wakeups):
            wakeups.add_metric(list(key), self.wakeups[key])
        yield wakeups
        yield counter(
            "upstream_retries", "Requests sent to another replica after one received nothing of them.", "retries"
        )
