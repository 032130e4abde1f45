"""Automatic rollback of a LoraAddon: pure decisions, no Kubernetes or HTTP I/O.

The rule (`spec.autoRollback`) compares each non-control version of an addon with the control version over a
sliding window of the router's own counters (requests by status code, and the TTFT and latency histograms, per
adapter version: `loraserve_router_requests_total` and the two histograms in its metrics, read from its
GET /load):

- a version is judged once it has `minRequests` requests in the window;
- error rate: 5xx answers / requests. It breaches when above `maxErrorRate` and above control's rate (when
  control fails as much, moving traffic to it helps nobody);
- optionally the p95 of TTFT or of latency (as Prometheus' histogram_quantile computes it from the buckets):
  breaches when above `maxTtftP95Ratio` / `maxLatencyP95Ratio` times control's p95; judged only when control
  has `minRequests` in the window too.

When a version breaches, all traffic goes to control: the effective targets (status) give control 100 and
every other version 0. The user's spec is never written (a GitOps tool would put it back). The rollback
holds for the spec generation it fired on; a new generation, or a new value of the re-arm annotation, re-arms
the rule and starts a fresh window (errors from before the re-arm do not count again).

Control is `autoRollback.control`, else the target with the largest weight (the first listed on a tie).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from loraserve.api.addon import LoraAddonSpec
from loraserve.autoscale.signals import LoadBuckets, RouterLoad, VersionRow

TTFT = "ttft"
LATENCY = "latency"

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class Counters:
    """Cumulative numbers of one adapter version, summed over router replicas."""

    requests: float = 0.0
    errors: float = 0.0
    ttft: Buckets = ()
    latency: Buckets = ()

    def minus(self, base: Counters) -> Counters:
        return Counters(
            self.requests - base.requests,
            self.errors - base.errors,
            _bucket_delta(self.ttft, base.ttft),
            _bucket_delta(self.latency, base.latency),
        )

    def reset_since(self, base: Counters) -> bool:
        """A counter went down: a router restarted, so the older sample is no base for this one."""
        return self.requests < base.requests or self.errors < base.errors


def _bucket_delta(now: Buckets, base: Buckets) -> Buckets:
    before = dict(base)
    return tuple((bound, count - before.get(bound, 0.0)) for bound, count in now)


AddonKey = tuple[str, str, str]  # (namespace, deployment, addon)
VersionRows = list[tuple[LoadBuckets, VersionRow]]  # one addon's version rows, with their router's bucket bounds


def versions_by_addon(loads: Iterable[RouterLoad]) -> dict[AddonKey, VersionRows]:
    """The version rows of every router replica's GET /load, per addon (the base model's series have no
    version and are not in it)."""
    out: dict[AddonKey, VersionRows] = {}
    for load in loads:
        for row in load.versions:
            out.setdefault(row[:3], []).append((load.buckets, row))
    return out


def version_counters(rows: VersionRows) -> dict[str, Counters]:
    """One addon's counters per version label, summed over the router replicas."""
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, dict[str, dict[float, float]]] = {TTFT: {}, LATENCY: {}}
    for bounds, (_, _, _, version, finished, failed, ttft, latency) in rows:
        requests[version] = requests.get(version, 0.0) + finished
        errors[version] = errors.get(version, 0.0) + failed
        for name, upper, counts in ((TTFT, bounds.ttft, ttft), (LATENCY, bounds.latency, latency)):
            per = buckets[name].setdefault(version, {})
            cumulative = 0.0
            for bound, count in zip((*upper, math.inf), counts, strict=False):
                cumulative += count
                per[bound] = per.get(bound, 0.0) + cumulative
    return {
        version: Counters(
            requests[version],
            errors[version],
            tuple(sorted(buckets[TTFT][version].items())),
            tuple(sorted(buckets[LATENCY][version].items())),
        )
        for version in requests
    }


def quantile(q: float, buckets: Buckets) -> float | None:
    """histogram_quantile(q) over cumulative buckets: linear within the bucket; None without observations.
    In the +Inf bucket it answers the largest finite bound, as Prometheus does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class History:
    """Samples of one addon's per-version counters, enough to answer 'the increase over the last window'."""

    samples: list[tuple[float, dict[str, Counters]]] = field(default_factory=list)

    def add(self, at: float, counters: Mapping[str, Counters], window: float) -> None:
        if self.samples:
            last = self.samples[-1][1]
            if any(c.reset_since(last[v]) for v, c in counters.items() if v in last):
                self.samples = []
        self.samples.append((at, dict(counters)))
        # Keep the newest sample at or before the window's start (the base) and everything after it.
        while len(self.samples) > 1 and self.samples[1][0] <= at - window:
            self.samples.pop(0)

    def delta(self) -> dict[str, Counters]:
        """Per version: the increase from the window's base sample to the newest one."""
        if not self.samples:
            return {}
        base = self.samples[0][1]
        newest = self.samples[-1][1]
        return {v: c.minus(base.get(v, Counters())) for v, c in newest.items()}


@dataclass(frozen=True)
class Breach:
    model_version: str
    version: str
    metric: str  # errorRate, ttftP95, latencyP95
    value: float
    control_value: float
    threshold: float
    requests: int

    def message(self, control: str, window: str) -> str:
        unit = "" if self.metric == "errorRate" else "s"
        limit = (
            f"above maxErrorRate {self.threshold:g}"
            if self.metric == "errorRate"
            else f"above {self.threshold:g} x control's"
        )
        return (
            f"rolled back {self.model_version} ({self.version}) to control {control}: {self.metric} "
            f"{self.value:.4g}{unit} over {window} ({self.requests} requests) is {limit} "
            f"(control {self.control_value:.4g}{unit})"
        )


def evaluate(spec: LoraAddonSpec, labels: Mapping[str, str], window_stats: Mapping[str, Counters]) -> Breach | None:
    """The first breach of the rule (targets in spec order; error rate, then TTFT, then latency), or None.

    `labels` maps ModelVersion name -> version label (v1); `window_stats` is keyed by the version label."""
    rule = spec.auto_rollback
    if rule is None:
        return None
    control = spec.control()
    base = window_stats.get(labels.get(control, ""), Counters())
    control_rate = base.errors / base.requests if base.requests > 0 else 0.0
    control_judged = base.requests >= rule.min_requests
    for target in spec.targets:
        mv = target.model_version
        label = labels.get(mv)
        if mv == control or label is None:
            continue
        stats = window_stats.get(label, Counters())
        if stats.requests < rule.min_requests:
            continue
        rate = stats.errors / stats.requests
        requests = int(stats.requests)
        if rate > rule.max_error_rate and rate > control_rate:
            return Breach(mv, label, "errorRate", rate, control_rate, rule.max_error_rate, requests)
        if not control_judged:
            continue
        for metric, ratio, mine, theirs in (
            ("ttftP95", rule.max_ttft_p95_ratio, stats.ttft, base.ttft),
            ("latencyP95", rule.max_latency_p95_ratio, stats.latency, base.latency),
        ):
            if ratio is None:
                continue
            value, reference = quantile(0.95, mine), quantile(0.95, theirs)
            if value is not None and reference is not None and reference > 0 and value > ratio * reference:
                return Breach(mv, label, metric, value, reference, ratio, requests)
    return None


@dataclass(frozen=True)
class Decision:
    effective: list[dict[str, Any]]  # status.effectiveTargets
    status: dict[str, Any] | None  # status.autoRollback (None: no rule)
    fired: Breach | None  # fired this round: the handler sends the Event
    rearmed: bool  # the rule was re-armed this round: the handler starts a fresh window
    condition: tuple[bool, str, str] | None  # RolledBack condition (status, reason, message); None: no rule


REASONS = {"errorRate": "ErrorRateExceeded", "ttftP95": "TtftP95Exceeded", "latencyP95": "LatencyP95Exceeded"}


def decide(
    spec: LoraAddonSpec,
    generation: int,
    rearm: str | None,
    previous: Mapping[str, Any] | None,
    labels: Mapping[str, str],
    window_stats: Mapping[str, Counters],
    now: datetime,
) -> Decision:
    """What the addon's status says about rollback this round, from the previous status and the window."""
    spec_targets = [{"modelVersion": t.model_version, "weight": t.weight} for t in spec.targets]
    rule = spec.auto_rollback
    if rule is None:
        return Decision(spec_targets, None, None, False, None)
    control = spec.control()
    to_control = [
        {"modelVersion": t.model_version, "weight": 100 if t.model_version == control else 0} for t in spec.targets
    ]
    prev = previous or {}
    if prev.get("rolledBack"):
        if prev.get("generation") == generation and prev.get("rearm") == rearm:
            return Decision(
                to_control, dict(prev), None, False, (True, str(prev.get("reason")), str(prev.get("message")))
            )
        armed = {"control": control, "rolledBack": False}
        message = "re-armed: routing by the spec's weights; a fresh window starts now"
        return Decision(spec_targets, armed, None, True, (False, "Rearmed", message))
    breach = evaluate(spec, labels, window_stats)
    if breach is None:
        message = f"armed: each version is compared with control {control} over {rule.window}"
        return Decision(spec_targets, {"control": control, "rolledBack": False}, None, False, (False, "Armed", message))
    message = breach.message(control, rule.window)
    fired = {
        "control": control,
        "rolledBack": True,
        "generation": generation,
        "rearm": rearm,
        "modelVersion": breach.model_version,
        "metric": breach.metric,
        "value": round(breach.value, 6),
        "controlValue": round(breach.control_value, 6),
        "threshold": breach.threshold,
        "requests": breach.requests,
        "at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reason": REASONS[breach.metric],
        "message": message,
    }
    return Decision(to_control, fired, breach, False, (True, REASONS[breach.metric], message))
