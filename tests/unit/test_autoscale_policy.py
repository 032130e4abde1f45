"""The pure autoscaling decisions, with a fake clock (plain floats): examples per rule, then properties."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loraserve.api.deployment import DeploymentSpec
from loraserve.autoscale import Decision, GpuMeter, Reason, ScalingPolicy, ScalingSettings, idle_gc_due

T0 = 1_000_000.0  # creation time of every deployment below
UP, DOWN, ZERO = 30.0, 600.0, 3600.0


def make(
    min_replicas: int = 0,
    max_replicas: int = 4,
    target: int = 8,
    up: float = UP,
    down: float = DOWN,
    zero: float = ZERO,
    last_request_time: float | None = None,
) -> ScalingPolicy:
    s = ScalingSettings(min_replicas, max_replicas, target, up, down, zero)
    return ScalingPolicy(s, created_at=T0, last_request_time=last_request_time)


def feed(policy: ScalingPolicy, start: float, end: float, load: float, step: float = 1.0, requests: int = 0) -> None:
    """Constant load sampled every `step` seconds over [start, end]."""
    n = round((end - start) / step)
    for i in range(n + 1):
        policy.observe(start + i * step, load, requests)


# ---- settings ------------------------------------------------------------------------------------------


def test_settings_from_spec_defaults() -> None:
    spec = DeploymentSpec(base_model="hf://org/model")
    s = ScalingSettings.from_spec(spec)
    assert s == ScalingSettings(0, 1, 8, 30.0, 600.0, 3600.0)


def test_settings_from_spec_custom() -> None:
    spec = DeploymentSpec(
        base_model="hf://org/model",
        min_replicas=2,
        max_replicas=6,
        target_load_per_replica=4,
        scale_up_window="1m30s",
        scale_down_window="300ms",
        scale_to_zero_window="1.5h",
    )
    assert ScalingSettings.from_spec(spec) == ScalingSettings(2, 6, 4, 90.0, 0.3, 5400.0)
    assert ScalingSettings.from_spec(DeploymentSpec(base_model="hf://o/m", min_replicas=3)).max_replicas == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_replicas": -1},
        {"min_replicas": 3, "max_replicas": 2},
        {"max_replicas": 0},
        {"target_load_per_replica": 0},
        {"scale_up_window": -1.0},
        {"scale_down_window": math.inf},
        {"scale_to_zero_window": math.nan},
    ],
)
def test_settings_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message differs
        ScalingSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("load", "expected"), [(0, 0), (1, 1), (8, 1), (9, 2), (16, 2), (17, 3), (1000, 4), (0.5, 1), (8.0, 1)]
)
def test_recommendation_is_ceil_clamped(load: float, expected: int) -> None:
    assert ScalingSettings(0, 4, 8).recommendation(load) == expected


def test_recommendation_clamped_to_min() -> None:
    assert ScalingSettings(2, 4, 8).recommendation(0) == 2


# ---- scale up ------------------------------------------------------------------------------------------


def test_scale_up_only_after_load_held_for_the_whole_window() -> None:
    p = make()
    feed(p, T0, T0 + 100, 0)  # history covers the windows' start
    feed(p, T0 + 101, T0 + 130, 24)  # asks for 3 from t=101
    assert p.desired(T0 + 130, 1) == Decision(1, Reason.STABLE, "")
    p.observe(T0 + 131, 24)
    d = p.desired(T0 + 131, 1)
    assert (d.replicas, d.reason) == (3, Reason.SCALE_UP)


def test_scale_up_goes_to_the_minimum_over_the_window() -> None:
    p = make()
    feed(p, T0, T0 + 100, 0)
    feed(p, T0 + 101, T0 + 110, 32)  # 4
    feed(p, T0 + 111, T0 + 120, 12)  # 2
    feed(p, T0 + 121, T0 + 140, 24)  # 3
    # window [110, 140]: the sample at 110 (4), then 2, then 3 -> min 2
    assert p.desired(T0 + 140, 1).replicas == 2
    # window [121, 151]: only 3s
    feed(p, T0 + 141, T0 + 151, 24)
    assert p.desired(T0 + 151, 1).replicas == 3


def test_a_dip_restarts_the_up_window() -> None:
    p = make()
    feed(p, T0, T0 + 100, 24)
    p.observe(T0 + 101, 0)
    feed(p, T0 + 102, T0 + 131, 24)
    assert p.desired(T0 + 131, 1).replicas == 1  # the dip at 101 is inside [101, 131]
    p.observe(T0 + 132, 24)
    assert p.desired(T0 + 132, 1).replicas == 3


def test_no_scale_up_with_less_history_than_the_window() -> None:
    p = make()
    feed(p, T0 + 10, T0 + 39, 32)  # 29 s of history < 30 s window
    assert p.desired(T0 + 39, 1).replicas == 1
    assert p.desired(T0 + 40, 1).replicas == 4  # the sample at 10 covers [10, 40]


def test_zero_up_window_scales_up_at_once() -> None:
    p = make(up=0.0)
    p.observe(T0, 20)
    assert p.desired(T0, 1) == Decision(3, Reason.SCALE_UP, "load asked for >= 3 through 0s")


def test_sparse_samples_hold_until_the_next() -> None:
    p = make()
    p.observe(T0, 40)  # one sample; holds
    assert p.desired(T0 + 29.999, 1).replicas == 1
    assert p.desired(T0 + 30, 1).replicas == 4


# ---- scale down ----------------------------------------------------------------------------------------


def test_scale_down_to_the_maximum_over_the_window() -> None:
    p = make()
    feed(p, T0, T0 + 100, 32, step=10)  # 4
    feed(p, T0 + 110, T0 + 300, 17, step=10)  # 3
    feed(p, T0 + 310, T0 + 800, 1, step=10)  # 1
    # window [200, 800]: the sample at 200 (3) is still in it
    assert p.desired(T0 + 800, 4) == Decision(3, Reason.SCALE_DOWN, "load asked for <= 3 through 600s")
    feed(p, T0 + 810, T0 + 910, 1, step=10)
    assert p.desired(T0 + 910, 3).replicas == 1


def test_scale_down_waits_for_the_whole_window() -> None:
    p = make()
    feed(p, T0, T0 + 100, 32)
    feed(p, T0 + 101, T0 + 699, 0)
    assert p.desired(T0 + 699, 4).replicas == 4  # the sample at 100 (4) is in effect at 99..101
    assert p.desired(T0 + 700, 4).replicas == 4  # ... still in effect at 100
    p.observe(T0 + 701, 0)
    assert p.desired(T0 + 701, 4) == Decision(1, Reason.SCALE_DOWN, "load asked for <= 0 through 600s")


def test_no_scale_down_with_less_history_than_the_window() -> None:
    p = make(last_request_time=T0)  # seen a request: awake through the zero window, so the down window decides
    feed(p, T0 + 1, T0 + 600, 0)
    assert p.desired(T0 + 600, 3).replicas == 3
    assert p.desired(T0 + 601, 3).replicas == 1


def test_down_window_never_takes_a_deployment_that_saw_a_request_to_zero() -> None:
    p = make()
    p.observe(T0, 1, 1)
    feed(p, T0 + 1, T0 + ZERO - 1, 0, step=5)
    d = p.desired(T0 + ZERO - 1, 2)
    assert d.replicas == 1
    assert p.desired(T0 + ZERO - 1, 1) == Decision(1, Reason.STABLE, "")


# ---- scale to zero -------------------------------------------------------------------------------------


def test_to_zero_exactly_when_the_window_passes() -> None:
    p = make()
    p.observe(T0 + 50, 1, 1)
    feed(p, T0 + 51, T0 + 50 + ZERO, 0, step=7)
    assert p.desired(T0 + 50 + ZERO - 1e-6, 1).replicas == 1
    d = p.desired(T0 + 50 + ZERO, 1)
    assert (d.replicas, d.reason) == (0, Reason.SCALE_TO_ZERO)
    assert p.desired(T0 + 50 + ZERO + 1, 0).reason is Reason.SCALED_TO_ZERO


def test_to_zero_from_several_replicas_is_governed_by_the_zero_window() -> None:
    p = make(zero=300.0)
    p.observe(T0, 30, 1)
    feed(p, T0 + 1, T0 + 300, 0)
    assert p.desired(T0 + 299, 4).replicas == 4  # down window (600 s) not covered
    assert p.desired(T0 + 300, 4).replicas == 0


def test_in_flight_load_keeps_it_up_and_restarts_the_zero_clock() -> None:
    p = make(zero=300.0)
    p.observe(T0, 1, 1)  # one long request, in flight until 1000
    feed(p, T0 + 10, T0 + 1000, 1, step=10)
    assert p.desired(T0 + 1000, 1).replicas == 1
    p.observe(T0 + 1001, 0)
    assert p.desired(T0 + 1299, 1).replicas == 1
    assert p.desired(T0 + 1300, 1).replicas == 0


def test_new_deployment_starts_at_zero_until_its_first_request() -> None:
    # minReplicas 0 and never a request: asleep from creation, no zero window to wait out (GPUs only with traffic)
    p = make()
    assert not p.awake(T0)
    assert p.desired(T0, 0) == Decision(0, Reason.SCALED_TO_ZERO, "no request since creation 0s ago")
    assert p.desired(T0, 1) == Decision(0, Reason.SCALE_TO_ZERO, "no request since creation 0s ago")
    feed(p, T0, T0 + 2 * ZERO, 0, step=60)
    for now in (T0 + 1, T0 + ZERO - 0.001, T0 + ZERO, T0 + 2 * ZERO):
        assert p.desired(now, 0).replicas == 0
        assert p.desired(now, 1).replicas == 0
    assert p.desired(T0 + 90, 0) == Decision(0, Reason.SCALED_TO_ZERO, "no request since creation 90s ago")
    # an operator restart (no status.lastRequestTime yet) keeps it asleep
    q = ScalingPolicy.restore(p.settings, {"createdAt": T0, "lastRequestTime": None})
    assert q.desired(T0 + 10, 1).replicas == 0
    # the first request wakes it at once, to one replica; from then on the zero clock is that request
    t_req = T0 + 2 * ZERO + 30
    p.observe(t_req, 0, 1)
    assert p.desired(t_req, 0) == Decision(1, Reason.WAKE, "request within the scale-to-zero window")
    feed(p, t_req + 60, t_req + ZERO, 0, step=60)
    assert p.desired(t_req + ZERO - 0.001, 1) == Decision(1, Reason.STABLE, "")
    assert p.desired(t_req + ZERO, 1) == Decision(0, Reason.SCALE_TO_ZERO, "no request for 3600s (window 3600s)")


def test_new_deployment_wakes_at_its_first_request_or_load_right_after_creation() -> None:
    # well inside what used to be a zero window counted from creation
    p = make()
    assert p.desired(T0 + 5, 0).replicas == 0
    p.observe(T0 + 5, 0, 1)
    assert p.desired(T0 + 5, 0) == Decision(1, Reason.WAKE, "request within the scale-to-zero window")
    q = make()
    q.observe(T0 + 5, 3)  # load alone: requests in flight or waiting
    assert q.desired(T0 + 5, 0) == Decision(1, Reason.WAKE, "request within the scale-to-zero window")
    r = make()
    r.record_request(T0 + 5)  # the router's wake call
    assert r.desired(T0 + 5, 0).replicas == 1


def test_zero_window_ignored_when_min_is_positive() -> None:
    p = make(min_replicas=2)
    feed(p, T0, T0 + 10 * ZERO, 0, step=600)
    assert p.zero_deadline() is None
    assert p.desired(T0 + 10 * ZERO, 2).replicas == 2
    assert p.desired(T0 + 10 * ZERO, 0) == Decision(2, Reason.MIN_REPLICAS, "minReplicas is 2")


# ---- wake ----------------------------------------------------------------------------------------------


def test_first_request_wakes_immediately() -> None:
    p = make(last_request_time=T0)
    feed(p, T0 + 60, T0 + 5 * ZERO, 0, step=60)
    assert p.desired(T0 + 5 * ZERO, 0).replicas == 0
    p.observe(T0 + 5 * ZERO + 0.5, 0, 1)  # a request arrived (already taken off the router's queue)
    assert p.desired(T0 + 5 * ZERO + 0.5, 0) == Decision(1, Reason.WAKE, "request within the scale-to-zero window")


def test_router_wake_call_wakes_immediately() -> None:
    p = make()
    now = T0 + 2 * ZERO
    assert p.desired(now, 0).replicas == 0
    p.record_request(now)
    assert p.desired(now, 0).replicas == 1


def test_waiting_load_alone_wakes() -> None:
    p = make()
    now = T0 + 2 * ZERO
    p.observe(now, 3)
    assert p.desired(now, 0).replicas == 1


def test_wake_is_to_one_then_the_up_window_applies() -> None:
    p = make()
    feed(p, T0 + ZERO, T0 + 2 * ZERO, 0, step=60)
    now = T0 + 2 * ZERO + 1
    p.observe(now, 40, 40)  # a burst at zero
    assert p.desired(now, 0).replicas == 1
    feed(p, now + 1, now + 30, 40)
    assert p.desired(now + 30, 1).replicas == 4


# ---- bounds --------------------------------------------------------------------------------------------


def test_current_above_max_is_lowered_at_once() -> None:
    p = make(max_replicas=2)
    p.observe(T0, 100, 1)
    assert p.desired(T0, 5) == Decision(2, Reason.MAX_REPLICAS, "maxReplicas is 2")


def test_current_below_min_is_raised_at_once() -> None:
    p = make(min_replicas=3)
    assert p.desired(T0, 1) == Decision(3, Reason.MIN_REPLICAS, "minReplicas is 3")


def test_settings_change_applies_min_max_at_once() -> None:
    p = make()
    feed(p, T0, T0 + 100, 100, requests=1)
    assert p.desired(T0 + 100, 1).replicas == 4
    p.update_settings(ScalingSettings(0, 2, 8, UP, DOWN, ZERO))
    assert p.desired(T0 + 100, 4).replicas == 2


def test_negative_inputs_refused() -> None:
    p = make()
    with pytest.raises(ValueError, match="load"):
        p.observe(T0, -1)
    with pytest.raises(ValueError, match="current"):
        p.desired(T0, -1)


# ---- stockout ------------------------------------------------------------------------------------------


def test_stockout_holds_the_count_and_does_not_bounce() -> None:
    p = make(max_replicas=8)
    feed(p, T0, T0 + 60, 40, requests=1)  # asks for 5
    assert p.desired(T0 + 60, 1).replicas == 5
    # only 3 of 5 fit; load now asks for 7: hold 5, do not add pods, do not fall back to 3
    feed(p, T0 + 61, T0 + 200, 56, requests=1)
    d = p.desired(T0 + 200, 5, schedulable=3)
    assert d == Decision(5, Reason.GPU_STOCKOUT, "load asks for 7, only 3 of 5 replicas schedulable: holding 5")
    # stock comes back: the scale-up proceeds
    assert p.desired(T0 + 200, 5, schedulable=5).replicas == 7


def test_stockout_does_not_block_load_driven_scale_down() -> None:
    p = make(max_replicas=8)
    feed(p, T0, T0 + 700, 8, requests=1)
    assert p.desired(T0 + 700, 5, schedulable=3).replicas == 1


def test_slow_start_is_not_a_stockout() -> None:
    # schedulable counts pods the scheduler placed (still starting or ready), so a slow start does not freeze
    p = make(max_replicas=8)
    feed(p, T0, T0 + 60, 56, requests=1)
    assert p.desired(T0 + 60, 5, schedulable=5).replicas == 7


# ---- persistence ---------------------------------------------------------------------------------------


def test_snapshot_round_trips_through_json() -> None:
    p = make()
    feed(p, T0, T0 + 100, 20, requests=1)
    feed(p, T0 + 101, T0 + 120, 3)
    data = json.loads(json.dumps(p.snapshot()))
    q = ScalingPolicy.restore(p.settings, data)
    assert q.snapshot() == p.snapshot()
    for now in (T0 + 120, T0 + 500, T0 + 800, T0 + 120 + ZERO):
        for current in range(5):
            assert q.desired(now, current) == p.desired(now, current)


def test_restart_keeps_the_zero_clock_from_last_request_time() -> None:
    p = make()
    p.observe(T0 + 1000, 4, 1)
    # the operator persisted only status.lastRequestTime, then restarted
    q = ScalingPolicy.restore(p.settings, {"createdAt": T0, "lastRequestTime": p.last_request_time})
    assert q.desired(T0 + 1000 + ZERO - 1, 1).replicas == 1
    assert q.desired(T0 + 1000 + ZERO, 1).replicas == 0
    # and no load-driven change until the history covers a window again
    q.observe(T0 + 1100, 32)
    assert q.desired(T0 + 1129, 1).replicas == 1
    assert q.desired(T0 + 1130, 1).replicas == 4


def test_record_request_keeps_the_latest() -> None:
    p = make()
    p.record_request(T0 + 50)
    p.record_request(T0 + 20)
    p.observe(T0 + 60, 0, 1, last_request_at=T0 + 55)
    assert p.last_request_time == T0 + 55


def test_clock_stepping_back_restarts_the_history() -> None:
    p = make()
    feed(p, T0, T0 + 100, 40, requests=1)
    p.observe(T0 + 50, 40)
    assert p.sample_count == 1
    assert p.desired(T0 + 79, 1).replicas == 1
    assert p.desired(T0 + 80, 1).replicas == 4


def test_samples_are_bounded_and_merged() -> None:
    p = make(up=30.0, down=60.0)
    for i in range(10_000):
        p.observe(T0 + i, i % 50)  # the recommendation changes often
    assert p.sample_count <= 62
    assert p.snapshot()["samples"][0][0] <= T0 + 9999 - 60
    q = make()
    feed(q, T0, T0 + 10_000, 3)  # constant: one step
    assert q.sample_count == 1


# ---- idle GC -------------------------------------------------------------------------------------------

WEEK = 7 * 86400.0


def test_idle_gc_after_a_week_without_requests() -> None:
    assert not idle_gc_due(T0 + WEEK - 1, T0, T0 - 10, 0, False)
    assert idle_gc_due(T0 + WEEK, T0, T0 - 10, 0, False)


def test_idle_gc_counts_a_fresh_deployment_from_creation() -> None:
    assert not idle_gc_due(T0 + WEEK - 1, None, T0, 0, False)
    assert idle_gc_due(T0 + WEEK, None, T0, 0, False)
    # a last request older than the object (stale status) counts from creation too
    assert not idle_gc_due(T0 + WEEK - 1, T0 - 100, T0, 0, False)


def test_idle_gc_only_min_zero_and_not_kept() -> None:
    assert not idle_gc_due(T0 + 10 * WEEK, None, T0, 1, False)
    assert not idle_gc_due(T0 + 10 * WEEK, None, T0, 0, True)


def test_idle_gc_custom_age() -> None:
    assert idle_gc_due(T0 + 60, None, T0, 0, False, gc_age=60)


@given(
    last=st.one_of(st.none(), st.floats(0, 1e7)),
    created=st.floats(0, 1e7),
    a=st.floats(0, 2e6),
    b=st.floats(0, 2e6),
)
def test_idle_gc_is_monotone_in_time(last: float | None, created: float, a: float, b: float) -> None:
    early, late = sorted((a, b))
    base = max(created, last or 0.0)
    if idle_gc_due(base + early, last, created, 0, False):
        assert idle_gc_due(base + late, last, created, 0, False)
    assert not idle_gc_due(base + early, last, created, 0, True)


# ---- GPU meter -----------------------------------------------------------------------------------------


def test_gpu_meter_integrates_the_previous_count() -> None:
    m = GpuMeter()
    assert m.sample(T0, 2, 4) == 0.0  # first sample: nothing to charge
    assert m.sample(T0 + 10, 1, 4) == 80.0  # 2 replicas x 4 GPUs x 10 s
    assert m.sample(T0 + 15, 0, 4) == 20.0
    assert m.sample(T0 + 100, 3, 4) == 0.0
    assert m.total == 100.0


def test_gpu_meter_resumes_from_status_and_ignores_a_clock_step_back() -> None:
    m = GpuMeter(total=1000.0)
    m.sample(T0, 1, 2)
    assert m.sample(T0 - 50, 1, 2) == 0.0
    assert m.sample(T0 - 40, 1, 2) == 20.0
    assert m.total == 1020.0
    with pytest.raises(ValueError, match="ready_replicas"):
        m.sample(T0, -1, 1)


@given(st.lists(st.tuples(st.floats(0, 1000), st.integers(0, 16), st.sampled_from([1, 2, 4, 8])), max_size=40))
def test_gpu_meter_total_is_the_sum_of_increments_and_the_integral(steps: list[tuple[float, int, int]]) -> None:
    m = GpuMeter()
    now, then, total, expected, prev = T0, T0, 0.0, 0.0, None
    for dt, ready, acc in steps:
        now += dt  # rounded at T0's magnitude: integrate over the times sampled, not the dt asked for
        total += m.sample(now, ready, acc)
        if prev is not None:
            expected += (now - then) * prev
        then, prev = now, ready * acc
    assert m.total == pytest.approx(total)
    assert m.total == pytest.approx(expected)


# ---- properties: a closed loop under a fake clock ------------------------------------------------------


@dataclass
class Oracle:
    """An independent re-statement of the rules from the full, unpruned trace."""

    s: ScalingSettings
    samples: list[tuple[float, float]] = field(default_factory=list)
    activity: list[float] = field(default_factory=list)

    def window(self, now: float, w: float) -> list[int] | None:
        start = now - w
        anchor = [i for i, (t, _) in enumerate(self.samples) if t <= start]
        if not anchor:
            return None
        return [self.s.recommendation(load) for t, load in self.samples[anchor[-1] :]]

    def last_activity(self) -> float | None:
        """The last request or load > 0; None: never one since creation."""
        return max(self.activity, default=None)

    def asleep(self, now: float) -> bool:
        """At zero: min 0, and never a request (asleep from creation) or none for the whole zero window."""
        last = self.last_activity()
        return self.s.min_replicas == 0 and (last is None or now - last >= self.s.scale_to_zero_window)

    def expected(self, now: float, current: int) -> int:
        s = self.s
        if self.asleep(now):
            return 0
        floor = max(1, s.min_replicas)
        base = min(max(current, floor), s.max_replicas)
        ups = self.window(now, s.scale_up_window)
        if ups is not None and min(ups) > base:
            return min(ups)
        downs = self.window(now, s.scale_down_window)
        if downs is not None and max([*downs, floor]) < base:
            return max([*downs, floor])
        return base


windows = st.tuples(
    st.sampled_from([0.0, 5.0, 30.0, 60.0]), st.sampled_from([0.0, 30.0, 120.0, 600.0]), st.sampled_from([300.0, 900.0])
)
bounds = st.tuples(st.integers(0, 3), st.integers(0, 4)).map(lambda mb: (mb[0], max(1, mb[0] + mb[1])))
steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0, 299.0, 300.0, 301.0, 1000.0]),
        st.one_of(st.just(0.0), st.integers(0, 60).map(float)),
        st.booleans(),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(windows=windows, mm=bounds, target=st.sampled_from([1, 4, 8]), trace=steps, start=st.integers(0, 6))
# asleep from creation, woken by the first request, then to zero a whole zero window after it
@example(
    (30.0, 600.0, 300.0), (0, 2), 8, [(0, 0, False), (1000, 0, False), (1, 0, True), (299, 0, False), (1, 0, False)], 1
)
def test_closed_loop_obeys_every_rule(
    windows: tuple[float, float, float],
    mm: tuple[int, int],
    target: int,
    trace: list[tuple[float, float, bool]],
    start: int,
) -> None:
    up, down, zero = windows
    s = ScalingSettings(mm[0], mm[1], target, up, down, zero)
    p = ScalingPolicy(s, created_at=T0)
    o = Oracle(s)
    now, current = T0, start
    for dt, load, arrived in trace:
        now += dt
        p.observe(now, load, int(arrived))
        o.samples.append((now, load))
        if arrived or load > 0:
            o.activity.append(now)
        d = p.desired(now, current)
        r = d.replicas
        # bounds
        assert s.min_replicas <= r <= s.max_replicas
        # zero exactly when there never was a request, or the zero window passed without one (only with min 0)
        last = o.last_activity()
        idle = last is None or now - last >= zero
        assert (r == 0) == (s.min_replicas == 0 and idle), (now, last, d)
        if s.min_replicas == 0 and last is None:
            assert r == 0  # never requested: asleep from creation, whatever `current` was
        floor = max(1, s.min_replicas)
        if r > max(current, floor) or (r > floor and current < floor):
            # a load-driven scale-up: only to what the whole up window asked for
            assert d.reason is Reason.SCALE_UP
            recs = o.window(now, up)
            assert recs is not None, "scaled up with less history than the window"
            assert r <= min(recs)
        if 0 < r < min(current, s.max_replicas):
            # a load-driven scale-down: never below what the down window asked for
            assert d.reason is Reason.SCALE_DOWN
            recs = o.window(now, down)
            assert recs is not None, "scaled down with less history than the window"
            assert r >= max(recs)
        if current == 0 and arrived:
            assert r >= 1  # wakes at once
        if arrived or load > 0:
            assert r >= 1  # a request or load now: never at zero, woken at once (also the very first one)
        assert r == o.expected(now, current), "the rules, restated from the full trace, disagree"
        current = r


@settings(max_examples=60, deadline=None)
@given(
    zero=st.floats(300.0, 86400.0),
    idle_before=st.floats(0.0, 10_000.0),
    eps=st.sampled_from([1e-6, 1e-3, 0.5, 1.0]),
    step=st.sampled_from([1.0, 7.0, 30.0]),
)
def test_zero_not_one_tick_early(zero: float, idle_before: float, eps: float, step: float) -> None:
    p = make(zero=zero)
    t_req = T0 + idle_before
    p.observe(t_req, 0, 1)
    for i in range(1, 50):
        p.observe(t_req + i * zero / 50, 0)
    assert p.desired(t_req + zero - eps, 1).replicas == 1
    assert p.desired(t_req + zero, 1).replicas == 0
    assert p.desired(t_req + zero + step, 0).replicas == 0
    p.observe(t_req + zero + step, 0, 1)
    assert p.desired(t_req + zero + step, 0).replicas == 1


def direction_changes(values: list[int]) -> int:
    moves = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


@settings(max_examples=100, deadline=None)
@given(
    low=st.integers(0, 40),
    high=st.integers(0, 80),
    dt=st.sampled_from([1.0, 2.0, 5.0]),
    half_period=st.integers(1, 6),
    start=st.integers(0, 6),
    target=st.sampled_from([4, 8]),
)
def test_no_flapping_on_load_faster_than_the_windows(
    low: int, high: int, dt: float, half_period: int, start: int, target: int
) -> None:
    # windows at least one full period of the square wave: each window sees both levels
    up = down = 2 * half_period * dt
    p = ScalingPolicy(ScalingSettings(0, 6, target, up, down, 300.0), created_at=T0)
    current, seen = start, [start]
    for i in range(2000):
        now = T0 + i * dt
        load = high if (i // half_period) % 2 else low
        p.observe(now, load, 1)  # requests keep coming
        current = p.desired(now, current).replicas
        seen.append(current)
    assert direction_changes(seen) == 0
    assert len(set(seen[1:])) <= 2  # at most one move (after the first decision), then steady
    lo, hi = sorted((p.settings.recommendation(low), p.settings.recommendation(high)))
    assert max(lo, 1) <= current <= max(hi, 1)


@settings(max_examples=100, deadline=None)
@given(
    load=st.integers(1, 100),
    cap=st.integers(0, 8),
    freed_at=st.one_of(st.none(), st.integers(0, 500)),
    jitter=st.lists(st.integers(-3, 3), min_size=1, max_size=20),
)
def test_stockout_does_not_oscillate(load: int, cap: int, freed_at: int | None, jitter: list[int]) -> None:
    # the cluster can place at most `cap` pods (until `freed_at`); the load is steady (small jitter)
    p = ScalingPolicy(ScalingSettings(0, 8, 8, 30.0, 120.0, 300.0), created_at=T0)
    current, seen = 1, [1]
    for i in range(800):
        now = T0 + i
        room = cap if freed_at is None or i < freed_at else 8
        p.observe(now, max(1, load + jitter[i % len(jitter)]), 1)
        schedulable = min(current, room)
        d = p.desired(now, current, schedulable=schedulable)
        if schedulable < current:
            assert d.replicas <= current  # stalled: never ask for more pods that cannot be placed
        current = d.replicas
        seen.append(current)
    assert direction_changes(seen) == 0


# ---- takeover: a new operator replica rebuilds the clocks from status and the router ---------------------


def test_takeover_counts_requests_served_while_no_operator_acted() -> None:
    old = make()
    old.observe(T0 + 1000, 0, 1, last_request_at=T0 + 1000)  # persisted as status.lastRequestTime
    # the leader dies; the router serves requests meanwhile (last one at T0 + 1500); a standby takes over with
    # no previous request count to compare, so its first sample counts no arrivals
    new = ScalingPolicy.restore(old.settings, {"createdAt": T0, "lastRequestTime": old.last_request_time})
    new.observe(T0 + 1510, 0, 0, last_request_at=T0 + 1500)
    assert new.zero_deadline() == T0 + 1500 + ZERO
    assert new.desired(T0 + 1000 + ZERO, 1) == Decision(1, Reason.STABLE, "")  # the persisted clock alone: zero
    assert new.desired(T0 + 1500 + ZERO, 1).replicas == 0


def test_a_router_series_older_than_the_deployment_does_not_wake_it() -> None:
    p = make()  # never requested: asleep from creation
    p.observe(T0 + 10, 0, 0, last_request_at=T0 - 5)  # a request to an earlier object of the same name
    assert p.last_request_time is None
    assert p.desired(T0 + 10, 0) == Decision(0, Reason.SCALED_TO_ZERO, "no request since creation 10s ago")


def test_takeover_within_a_down_window_scales_down_no_earlier() -> None:
    old = make(min_replicas=1, down=DOWN)
    feed(old, T0, T0 + 100, 32, requests=1)  # 4 replicas' worth
    feed(old, T0 + 101, T0 + 400, 0)  # idle since T0 + 101: the old leader would scale down at T0 + 101 + DOWN
    assert old.desired(T0 + 400, 4).replicas == 4
    new = ScalingPolicy.restore(old.settings, {"createdAt": T0, "lastRequestTime": old.last_request_time})
    for now in range(int(T0) + 405, int(T0 + 101 + DOWN) + 1):
        new.observe(now, 0)
        assert new.desired(now, 4).replicas == 4, now
    # it scales down once it has watched a whole window itself
    feed(new, T0 + 101 + DOWN, T0 + 405 + DOWN, 0)
    assert new.desired(T0 + 405 + DOWN, 4) == Decision(1, Reason.SCALE_DOWN, f"load asked for <= 1 through {DOWN:g}s")


# ---- when an idle Deployment must be looked at again ---------------------------------------------------


def _what(decision: Decision) -> tuple[int, Reason]:
    return decision.replicas, decision.reason  # the message counts the seconds idle


@settings(max_examples=200, deadline=None)
@given(
    changes=st.lists(st.tuples(st.integers(1, 1500), st.integers(0, 30)), min_size=1, max_size=6),
    min_replicas=st.integers(0, 2),
    current=st.integers(0, 3),
)
def test_idle_decisions_change_only_at_next_change(
    changes: list[tuple[int, int]], min_replicas: int, current: int
) -> None:
    """An idle Deployment is looked at only at `next_change`: between looks, with no load and no new sample,
    `desired` must not move (else a scale-down or scale to zero would wait for the resync). Also with the
    deadlines left out that cannot move it (`current` known)."""
    policy = make(min_replicas=min_replicas, up=30, down=100, zero=300)
    schedule = sorted({T0 + t: load for t, load in changes}.items())
    ends = [t for t, _ in schedule[1:]] + [T0 + 2000]
    for (start, load), end in zip(schedule, ends, strict=True):
        policy.observe(start, float(load), 1 if load else 0)
        if load:
            continue  # busy: looked at every tick, not by deadline
        look = start
        while look < end:
            decided = _what(policy.desired(look, current))
            nxt = policy.next_change(look, current)
            assert nxt is None or policy.next_change(look) is not None  # knowing `current` drops deadlines only
            until = min(nxt if nxt is not None else end, end)
            for t in range(int(look) + 1, math.ceil(until)):
                assert _what(policy.desired(float(t), current)) == decided, (look, t, nxt)
            if nxt is None or nxt >= end:
                break
            look = nxt


def test_a_window_that_can_only_ask_for_the_current_count_is_no_deadline() -> None:
    policy = make(min_replicas=1, max_replicas=4, up=30, down=600, zero=3600)
    policy.observe(T0, 0.0)  # idle from creation: recommends 0, clamped to min 1
    assert policy.next_change(T0) == T0 + 30  # the up window fills
    assert policy.next_change(T0, current=1) is None  # at 1 whatever the windows hold: nothing to look at
    assert policy.next_change(T0, current=2) == T0 + 30  # above what the load asks: the down window will act
    policy.observe(T0 + 5, 20.0, 1)  # 3 replicas' worth: the up window decides at T0 + 35
    assert policy.next_change(T0 + 5, current=1) == T0 + 30
    assert policy.desired(T0 + 35, 1).replicas == 3


def test_next_look_is_a_tick_while_busy_else_the_first_deadline_within_bounds() -> None:
    from loraserve.autoscale import next_look

    assert next_look(T0, 2.0, True, (T0 + 500,), 300.0) == 2.0
    assert next_look(T0, 2.0, False, (T0 + 500, None, T0 + 60), 300.0) == 60.0
    assert next_look(T0, 2.0, False, (T0 + 0.5,), 300.0) == 2.0  # no sooner than a tick
    assert next_look(T0, 2.0, False, (None, T0 + 9000), 300.0) == 300.0
    assert next_look(T0, 2.0, False, (), 300.0) == 300.0


def test_idle_gc_at_is_the_moment_idle_gc_becomes_due() -> None:
    from loraserve.autoscale import idle_gc_at

    assert idle_gc_at(T0, T0 - 10, 0, False, gc_age=60) == T0 + 60
    assert idle_gc_at(None, T0, 0, False, gc_age=60) == T0 + 60
    assert idle_gc_at(None, T0, 1, False) is None
    assert idle_gc_at(None, T0, 0, True) is None
    assert idle_gc_due(T0 + 60, T0, T0 - 10, 0, False, gc_age=60)
    assert not idle_gc_due(T0 + 59.9, T0, T0 - 10, 0, False, gc_age=60)
