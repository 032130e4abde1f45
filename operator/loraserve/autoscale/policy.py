"""Windowed autoscaling decisions: pure, clock injected (every call takes `now`, seconds), no I/O.

The rules (design.md, "Semantics to get exactly right"), as implemented here:

* Recommendation of one load sample: ``ceil(load / targetLoadPerReplica)``, clamped to [min, max]. Load is
  in-flight + waiting requests of the deployment. A sample holds until the next one (a step function).
* Scale UP only to the MINIMUM recommendation over the last scale-up window ``[now - up, now]``. With less
  history than the window (the oldest kept sample is younger than ``now - up``), no load-driven scale-up.
* Scale DOWN only to the MAXIMUM recommendation over the last scale-down window; with less history than the
  window, no load-driven scale-down either (after an operator restart the history starts empty).
* Scale to ZERO (only with minReplicas 0): once there was no request for the whole scale-to-zero window,
  ``now >= zero_clock + zeroWindow`` (not one tick earlier). ``zero_clock`` is the last request time (an
  arrival, or a sample with load > 0: a request in flight or waiting counts as activity, so one is never cut
  off). Until then a deployment keeps at least one replica, however idle: the down-window never takes it to
  zero. The router's last-request time counts whenever it is reported, so requests served while no operator
  acted (a restart, a takeover) still move the clock after it.
* A minReplicas 0 deployment that has NEVER seen a request (and has no load) starts ASLEEP, at zero replicas,
  from creation on: GPUs only while there is traffic. It gets no zero window after creation (idle garbage
  collection, :func:`idle_gc_due`, still counts from creation for it).
* WAKE: from zero, the first request (an arrival given to :meth:`ScalingPolicy.observe` or
  :meth:`ScalingPolicy.record_request`, or any load) raises the floor to one replica IMMEDIATELY, with no window;
  from then on the zero clock is the last request time.
* Never below minReplicas, never above maxReplicas; a ``current`` outside the bounds is corrected at once.
* GPU stockout (see :meth:`ScalingPolicy.desired`): ``current`` is the count last asked for (spec.replicas),
  never the ready count, and recommendations depend only on load, never on how many replicas are up; so a
  stockout cannot drive a scale-down. While stalled (``schedulable < current``: pods beyond ``schedulable``
  cannot be placed) load-driven scale-UP is frozen at ``current``: we keep asking for the same count, neither
  adding unschedulable pods nor bouncing down. Scale-down, scale-to-zero and the min/max bounds still apply.

History is kept as (time, recommendation) steps, merged when the recommendation does not change, and pruned
to the longest of the up/down windows (plus the one sample in effect at that window's start), so memory is
bounded by the number of recommendation changes inside that window. A clock that steps back restarts the
history (as after a restart: no load-driven change until the windows fill again). Recommendations are stored unclamped
and clamped when read, so a change of min/max applies at once; a change of targetLoadPerReplica applies to
new samples (older ones age out within the windows).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraserve.api.deployment import DeploymentSpec


class Reason(StrEnum):
    """Why `desired` returned what it did (goes to status.scaleReason / Events)."""

    STABLE = "Stable"
    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    SCALE_TO_ZERO = "ScaleToZero"
    SCALED_TO_ZERO = "ScaledToZero"
    WAKE = "Wake"
    MIN_REPLICAS = "MinReplicas"
    MAX_REPLICAS = "MaxReplicas"
    GPU_STOCKOUT = "GPUStockout"


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: Reason
    message: str = ""


@dataclass(frozen=True)
class ScalingSettings:
    """The knobs of one Deployment, windows in seconds."""

    min_replicas: int = 0
    max_replicas: int = 1
    target_load_per_replica: int = 8
    scale_up_window: float = 30.0
    scale_down_window: float = 600.0
    scale_to_zero_window: float = 3600.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError("min_replicas must be >= 0")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError("max_replicas must be >= max(1, min_replicas)")
        if self.target_load_per_replica < 1:
            raise ValueError("target_load_per_replica must be >= 1")
        for name in ("scale_up_window", "scale_down_window", "scale_to_zero_window"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds >= 0")

    @classmethod
    def from_spec(cls, spec: DeploymentSpec) -> ScalingSettings:
        up, down, zero = spec.window_seconds()
        return cls(
            min_replicas=spec.min_replicas,
            max_replicas=spec.effective_max_replicas,
            target_load_per_replica=spec.target_load_per_replica,
            scale_up_window=up,
            scale_down_window=down,
            scale_to_zero_window=zero,
        )

    @property
    def history_horizon(self) -> float:
        """How far back samples are needed (the zero window needs only the last request time)."""
        return max(self.scale_up_window, self.scale_down_window)

    def raw_recommendation(self, load: float) -> int:
        if load <= 0:
            return 0
        if isinstance(load, int):
            return -(-load // self.target_load_per_replica)
        return math.ceil(load / self.target_load_per_replica)

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)

    def recommendation(self, load: float) -> int:
        """``ceil(load / target)`` clamped to [min, max]."""
        return self.clamp(self.raw_recommendation(load))


@dataclass
class ScalingPolicy:
    """Load history + idle clock of one Deployment; `desired` is a pure read of it.

    Feed it `observe` samples, ask `desired`. Persist :meth:`snapshot` (at least ``last_request_time``, which
    the operator keeps in status.lastRequestTime) and rebuild with :meth:`restore` after a restart.
    """

    settings: ScalingSettings
    created_at: float
    last_request_time: float | None = None
    _samples: deque[tuple[float, int]] = field(default_factory=deque, init=False, repr=False)
    _last_load: float = field(default=0.0, init=False, repr=False)
    _last_seen: float | None = field(default=None, init=False, repr=False)

    # ---- feeding -------------------------------------------------------------------------------------

    def observe(
        self, now: float, load: float, requests_since_last: int = 0, *, last_request_at: float | None = None
    ) -> None:
        """One metrics sample: `load` = in-flight + waiting requests now; `requests_since_last` > 0 means
        requests arrived since the previous sample (at `last_request_at` if the router says when, else now).
        A sample with load > 0 also counts as request activity at `now` (requests are in flight or waiting).

        `last_request_at` (the router's last-request time) counts even with no arrivals counted: the first
        sample after a restart or a takeover has no previous count to compare, and requests served while no
        operator was acting must still move the zero clock. A time before creation (a router series left from
        an earlier object of the same name) does not count.
        """
        if load < 0 or not math.isfinite(load):
            raise ValueError(f"load must be a finite number >= 0, got {load!r}")
        if self._last_seen is not None and now < self._last_seen:
            self._samples.clear()  # the clock stepped back: restart the history rather than trust it
        self._last_seen = now
        if last_request_at is not None and last_request_at >= self.created_at:
            self.record_request(last_request_at)
        elif requests_since_last > 0:
            self.record_request(now)
        if load > 0:
            self.record_request(now)  # requests in flight or waiting now: the deployment is in use
        self._last_load = load
        rec = self.settings.raw_recommendation(load)
        if not self._samples or self._samples[-1][1] != rec:
            self._samples.append((now, rec))
        self._prune(now)

    def record_request(self, at: float) -> None:
        """A request arrived at `at` (the router's wake call, or its last-request-time metric)."""
        if self.last_request_time is None or at > self.last_request_time:
            self.last_request_time = at

    def update_settings(self, settings: ScalingSettings) -> None:
        self.settings = settings
        if self._last_seen is not None:
            self._prune(self._last_seen)

    def _prune(self, now: float) -> None:
        # Keep the sample in effect at `now - horizon` (samples[0]) and everything after it.
        edge = now - self.settings.history_horizon
        samples = self._samples
        while len(samples) >= 2 and samples[1][0] <= edge:
            samples.popleft()

    # ---- reading ---------------------------------------------------------------------------------------

    @property
    def sample_count(self) -> int:
        return len(self._samples)

    @property
    def zero_clock(self) -> float:
        """When the scale-to-zero window started: the last request, or creation if none was ever seen (such a
        deployment is asleep from creation on, see :meth:`awake`; this only dates its idleness)."""
        if self.last_request_time is None:
            return self.created_at
        return max(self.last_request_time, self.created_at)

    def zero_deadline(self) -> float | None:
        """The time from which the deployment goes to zero if no request comes first (None: min > 0).

        For a min-0 deployment that never saw a request this is creation + window, but it sits at zero before
        that already (:meth:`awake` is False from creation until the first request or load)."""
        if self.settings.min_replicas > 0:
            return None
        return self.zero_clock + self.settings.scale_to_zero_window

    def awake(self, now: float) -> bool:
        """False once a min-0 deployment may sit at zero: no request for the whole zero window, no load.
        A min-0 deployment that has never seen a request starts at zero: no GPU until someone asks."""
        deadline = self.zero_deadline()
        if deadline is not None and self.last_request_time is None and self._last_load == 0:
            return False  # never requested, nothing in flight: asleep from creation, no zero window to wait out
        return deadline is None or now < deadline or self._last_load > 0

    def _window(self, now: float, window: float) -> list[int] | None:
        """Raw recommendations in effect during [now - window, now]; None if history is shorter."""
        samples = self._samples
        if not samples or samples[0][0] > now - window:
            return None
        start = now - window
        out: list[int] = []
        # Walk from the newest back to the sample in effect at `start`.
        for t, rec in reversed(samples):
            out.append(rec)
            if t <= start:
                break
        return out

    def window_min(self, now: float, window: float) -> int | None:
        recs = self._window(now, window)
        return None if recs is None else self.settings.clamp(min(recs))

    def window_max(self, now: float, window: float) -> int | None:
        recs = self._window(now, window)
        return None if recs is None else self.settings.clamp(max(recs))

    def desired(self, now: float, current: int, schedulable: int | None = None) -> Decision:
        """The replica count to ask for.

        `current`: the replica count last asked for (spec.replicas), NOT the ready count.
        `schedulable`: how many of those the cluster could place (not Pending as Unschedulable); None if
        unknown. ``schedulable < current`` is a GPU stockout: scale-up is frozen at `current` (see module doc).
        """
        s = self.settings
        if current < 0:
            raise ValueError("current must be >= 0")
        if not self.awake(now):
            idle_for = now - self.zero_clock
            if self.last_request_time is None:  # never requested: asleep from creation, whatever the window
                return Decision(
                    0,
                    Reason.SCALED_TO_ZERO if current == 0 else Reason.SCALE_TO_ZERO,
                    f"no request since creation {idle_for:.0f}s ago",
                )
            if current == 0:
                return Decision(0, Reason.SCALED_TO_ZERO, f"no request for {idle_for:.0f}s")
            return Decision(
                0, Reason.SCALE_TO_ZERO, f"no request for {idle_for:.0f}s (window {s.scale_to_zero_window:g}s)"
            )
        floor = max(s.min_replicas, 1)  # min, or one replica while a min-0 deployment is awake
        if current > s.max_replicas:
            base, reason, msg = s.max_replicas, Reason.MAX_REPLICAS, f"maxReplicas is {s.max_replicas}"
        elif current < floor:
            if current == 0 and s.min_replicas == 0:
                base, reason, msg = floor, Reason.WAKE, "request within the scale-to-zero window"
            else:
                base, reason, msg = floor, Reason.MIN_REPLICAS, f"minReplicas is {s.min_replicas}"
        else:
            base, reason, msg = current, Reason.STABLE, ""

        up = self.window_min(now, s.scale_up_window)
        if up is not None and up > base:
            if schedulable is not None and schedulable < current:
                return Decision(
                    base,
                    Reason.GPU_STOCKOUT if base == current else reason,
                    f"load asks for {up}, only {schedulable} of {current} replicas schedulable: holding {base}",
                )
            return Decision(up, Reason.SCALE_UP, f"load asked for >= {up} through {s.scale_up_window:g}s")
        down = self.window_max(now, s.scale_down_window)
        if down is not None and max(down, floor) < base:
            target = max(down, floor)
            return Decision(target, Reason.SCALE_DOWN, f"load asked for <= {down} through {s.scale_down_window:g}s")
        return Decision(base, reason, msg)

    def next_change(self, now: float, current: int | None = None) -> float | None:
        """The earliest time after `now` at which :meth:`desired` may answer differently with no new sample:
        when a recommendation leaves the up or down window (or the history first fills one), or the zero
        window ends. None: nothing pending (only new load can change the answer). With load > 0 the caller
        samples every tick anyway; this is for the quiet between events.

        With `current` (the replicas asked for now, as `desired` is asked): the windows are left out while every
        recommendation in the history (clamped) is `current` itself: however the windows fill, they then ask for
        `current`. (After a burst of creates, or a restart, that was a look per Deployment at
        the end of each window, to decide nothing.)"""
        s = self.settings
        times: list[float] = []
        if current is None or not self._windows_hold(current):
            times = [t + w for t, _ in self._samples for w in (s.scale_up_window, s.scale_down_window)]
        deadline = self.zero_deadline()
        if deadline is not None and self.last_request_time is not None:
            times.append(deadline)
        later = [t for t in times if t > now]
        return min(later) if later else None

    def _windows_hold(self, current: int) -> bool:
        return all(self.settings.clamp(rec) == current for _, rec in self._samples)

    # ---- persistence -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state. Only ``lastRequestTime`` must survive a restart; the rest is a warm start."""
        return {
            "createdAt": self.created_at,
            "lastRequestTime": self.last_request_time,
            "lastLoad": self._last_load,
            "lastSeen": self._last_seen,
            "samples": [[t, rec] for t, rec in self._samples],
        }

    @classmethod
    def restore(cls, settings: ScalingSettings, data: Mapping[str, Any]) -> ScalingPolicy:
        last = data.get("lastRequestTime")
        policy = cls(
            settings=settings,
            created_at=float(data["createdAt"]),
            last_request_time=None if last is None else float(last),
        )
        policy._last_load = float(data.get("lastLoad", 0.0))
        seen = data.get("lastSeen")
        policy._last_seen = None if seen is None else float(seen)
        for t, rec in data.get("samples", ()):
            policy._samples.append((float(t), int(rec)))
        return policy


def next_look(now: float, tick: float, busy: bool, deadlines: Iterable[float | None], resync: float) -> float:
    """Seconds until a Deployment's autoscaler looks again: every tick while busy (load, or a change under
    way), else at its first deadline (a window's end, idle GC, the GPU meter's status write), no sooner than a
    tick and no later than `resync`. Between looks, events wake it (traffic, a spec change, a replica)."""
    if busy:
        return tick
    due = min((d - now for d in deadlines if d is not None), default=resync)
    return min(max(due, tick), resync)


def idle_gc_at(
    last_request_time: float | None,
    created_at: float,
    min_replicas: int,
    keep_annotation: bool,
    gc_age: float = 7 * 86400,
) -> float | None:
    """When a Deployment becomes due for idle garbage collection (None: never, as things stand).

    Only minReplicas 0 deployments, never one carrying the keep (opt-out) annotation; due once no request
    for `gc_age` seconds, counting from creation when none was ever seen (or the last request predates it).
    """
    if min_replicas != 0 or keep_annotation:
        return None
    since = created_at if last_request_time is None else max(last_request_time, created_at)
    return since + gc_age


def idle_gc_due(
    now: float,
    last_request_time: float | None,
    created_at: float,
    min_replicas: int,
    keep_annotation: bool,
    gc_age: float = 7 * 86400,
) -> bool:
    """Whether a Deployment is due for idle garbage collection (see :func:`idle_gc_at`)."""
    due = idle_gc_at(last_request_time, created_at, min_replicas, keep_annotation, gc_age)
    return due is not None and now >= due


@dataclass
class GpuMeter:
    """GPU-seconds: ready replicas x accelerators per replica x seconds, integrated between samples.

    Each sample charges the interval since the previous sample at the previous sample's count (the count that
    held over the interval). The first sample (also after a restart) charges nothing; a clock that steps back
    charges nothing for that step and counts on from the new time. Start `total` from status.gpuSeconds to
    keep accumulating across restarts.
    """

    total: float = 0.0
    _last: tuple[float, int] | None = field(default=None, init=False, repr=False)

    def sample(self, now: float, ready_replicas: int, accelerator_count: int) -> float:
        """Record the count at `now`; returns the GPU-seconds added by this sample."""
        if ready_replicas < 0 or accelerator_count < 0:
            raise ValueError("ready_replicas and accelerator_count must be >= 0")
        increment = 0.0
        if self._last is not None:
            then, gpus = self._last
            if now > then:
                increment = (now - then) * gpus
        self._last = (now, ready_replicas * accelerator_count)
        self.total += increment
        return increment
