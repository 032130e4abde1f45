"""Pure: the autoscaler's inputs, read from the router's Prometheus text (one or more router replicas)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class RouterSignal:
    """Per deployment, summed over addons and router replicas. In-flight includes requests held at zero."""

    in_flight: float = 0.0
    held: float = 0.0
    requests_total: float = 0.0
    last_request: float | None = None


def parse_router_metrics(texts: list[str]) -> dict[tuple[str, str], RouterSignal]:
    """(namespace, deployment) -> signal, from the /metrics text of every router replica."""
    return _parse(texts, by_addon=False)  # type: ignore[return-value]


def parse_router_addon_metrics(texts: list[str]) -> dict[tuple[str, str, str], RouterSignal]:
    """(namespace, deployment, addon) -> signal; addon "" is the base model."""
    return _parse(texts, by_addon=True)  # type: ignore[return-value]


def _parse(texts: list[str], by_addon: bool) -> dict[tuple[str, ...], RouterSignal]:
    out: dict[tuple[str, ...], RouterSignal] = defaultdict(RouterSignal)
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key: tuple[str, ...] = (sample.labels.get("namespace", ""), sample.labels.get("deployment", ""))
                if not key[1]:
                    continue
                if by_addon:
                    key = (*key, sample.labels.get("addon", ""))
                if sample.name == "loraserve_router_requests_in_flight":
                    out[key].in_flight += sample.value
                elif sample.name == "loraserve_router_requests_held":
                    out[key].held += sample.value
                elif sample.name == "loraserve_router_requests_total":
                    out[key].requests_total += sample.value
                elif sample.name == "loraserve_router_last_request_timestamp_seconds" and sample.value > 0:
                    prev = out[key].last_request
                    out[key].last_request = sample.value if prev is None else max(prev, sample.value)
    return dict(out)
