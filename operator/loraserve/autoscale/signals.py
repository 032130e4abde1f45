"""Pure: the autoscaler's inputs, read from the routers' GET /load (one body per router replica;
loraserve.router.metrics.RouterMetrics.load writes it). The rollback reads the same bodies' versions."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

# [namespace, deployment, addon, in flight, held, requests finished, last request time (0: none)]
AddonRow = tuple[str, str, str, float, float, float, float]
# [namespace, deployment, addon, version, requests finished, of them 5xx, TTFT counts, latency counts]
VersionRow = tuple[str, str, str, str, float, float, list[float], list[float]]


class LoadBuckets(BaseModel):
    """The histograms' upper bounds, +Inf left out: each count list has one more entry, for +Inf."""

    ttft: list[float]
    latency: list[float]


class RouterLoad(BaseModel):
    """One router replica's GET /load, format 1. Parse with `RouterLoad.model_validate_json`: a body that is
    not one (another service at that address, another format) is a pydantic ValidationError."""

    model_config = ConfigDict(frozen=True)

    format: Literal[1]
    buckets: LoadBuckets
    addons: list[AddonRow]
    versions: list[VersionRow]


@dataclass
class RouterSignal:
    """Per deployment, summed over addons and router replicas. In-flight includes requests held at zero."""

    in_flight: float = 0.0
    held: float = 0.0
    requests_total: float = 0.0
    last_request: float | None = None

    def add(self, in_flight: float, held: float, requests: float, last_request: float) -> None:
        self.in_flight += in_flight
        self.held += held
        self.requests_total += requests
        if last_request > 0:
            self.last_request = last_request if self.last_request is None else max(self.last_request, last_request)


def deployment_signals(loads: Iterable[RouterLoad]) -> dict[tuple[str, str], RouterSignal]:
    """(namespace, deployment) -> signal, summed over its addons and the router replicas."""
    out: dict[tuple[str, str], RouterSignal] = defaultdict(RouterSignal)
    for load in loads:
        for namespace, deployment, _, *numbers in load.addons:
            out[(namespace, deployment)].add(*numbers)
    return dict(out)


def addon_signals(loads: Iterable[RouterLoad]) -> dict[tuple[str, str, str], RouterSignal]:
    """(namespace, deployment, addon) -> signal, summed over the router replicas; addon "" is the base model."""
    out: dict[tuple[str, str, str], RouterSignal] = defaultdict(RouterSignal)
    for load in loads:
        for namespace, deployment, addon, *numbers in load.addons:
            out[(namespace, deployment, addon)].add(*numbers)
    return dict(out)
