"""The automatic rollback rule: the window over the router's counters, the comparison with control, the
decision that moves traffic to control in status only, and how it is re-armed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from loraserve.api.addon import LoraAddonSpec
from loraserve.autoscale.signals import RouterLoad
from loraserve.rollback import Counters, History, decide, evaluate, quantile, version_counters, versions_by_addon
from loraserve.router.metrics import RouterMetrics

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
LABELS = {"bot-v1": "v1", "bot-v2": "v2"}


def spec(**rule: Any) -> LoraAddonSpec:
    return LoraAddonSpec.model_validate(
        {
            "deployment": "d",
            "targets": [{"modelVersion": "bot-v1", "weight": 90}, {"modelVersion": "bot-v2", "weight": 10}],
            "autoRollback": {"maxErrorRate": 0.05, "minRequests": 20, **rule},
        }
    )


def stats(requests: float, errors: float = 0, latency: tuple[float, ...] = ()) -> Counters:
    bounds = (0.1, 0.5, 1.0, 5.0, float("inf"))
    counts = [sum(1 for x in latency if x <= b) for b in bounds]
    buckets = tuple(zip(bounds, map(float, counts), strict=True))
    return Counters(requests, errors, buckets, buckets)


def test_counters_from_the_routers_own_load_summed_over_replicas() -> None:
    loads = []
    for _ in range(2):  # two router replicas
        m = RouterMetrics()
        for code in (200, 200, 503):
            m.series("ns", "d", "bot", "v2").finished(code)
        m.series("ns", "d", "bot", "v2").ttft.observe(0.3)
        m.series("ns", "d", "bot", "v2").duration.observe(1.0)  # on a bound: in its bucket, as Prometheus' le
        m.series("ns", "d", "bot", "v1").finished(200)
        m.series("ns", "d", None).finished(500)  # the base model: no version, not judged
        m.series("ns", "d", "other", "v1").finished(500)
        loads.append(RouterLoad.model_validate_json(m.load(versions=True)))
    assert RouterLoad.model_validate_json(m.load()).versions == []  # asked for only while a rule reads them
    rows = versions_by_addon(loads)
    assert set(rows) == {("ns", "d", "bot"), ("ns", "d", "other")}
    counters = version_counters(rows[("ns", "d", "bot")])
    assert set(counters) == {"v1", "v2"}
    v2 = counters["v2"]
    assert (v2.requests, v2.errors) == (6, 2)
    assert dict(v2.ttft)[0.5] == 2
    assert dict(v2.ttft)[0.25] == 0
    assert dict(v2.ttft)[float("inf")] == 2
    assert dict(v2.latency)[1.0] == 2
    assert dict(v2.latency)[0.5] == 0


def test_quantile_as_prometheus_interpolates() -> None:
    buckets = ((1.0, 50.0), (2.0, 100.0), (float("inf"), 100.0))
    assert quantile(0.5, buckets) == 1.0
    assert quantile(0.95, buckets) == pytest.approx(1.9)
    assert quantile(0.95, ((1.0, 0.0), (float("inf"), 10.0))) == 1.0  # in +Inf: the largest finite bound
    assert quantile(0.95, ()) is None


def test_history_measures_the_increase_over_the_window_only() -> None:
    h = History()
    h.add(0, {"v2": Counters(100, 50)}, window=60)  # old errors, before the window
    h.add(20, {"v2": Counters(110, 50)}, window=60)
    h.add(80, {"v2": Counters(130, 51)}, window=60)
    # base = the newest sample at or before 80 - 60 = 20: the one at 0 is dropped
    assert h.delta()["v2"].requests == 20
    assert h.delta()["v2"].errors == 1
    assert len(h.samples) == 2
    h.add(90, {"v2": Counters(5, 5), "v3": Counters(1, 0)}, window=60)  # a router restarted: counters reset
    assert h.delta() == {"v2": Counters(0, 0), "v3": Counters(0, 0)}


def test_error_rate_breach_against_control() -> None:
    s = spec()
    assert evaluate(s, LABELS, {"v1": stats(100), "v2": stats(19, 19)}) is None  # below minRequests
    breach = evaluate(s, LABELS, {"v1": stats(100, 1), "v2": stats(20, 5)})
    assert breach is not None
    assert (breach.model_version, breach.metric) == ("bot-v2", "errorRate")
    assert (breach.value, breach.control_value) == (0.25, 0.01)
    # control fails as badly: moving traffic to it helps nobody
    assert evaluate(s, LABELS, {"v1": stats(100, 30), "v2": stats(20, 5)}) is None
    assert evaluate(s, LABELS, {"v1": stats(100), "v2": stats(100, 5)}) is None  # 0.05 is not above 0.05


def test_latency_ratio_needs_control_traffic_too() -> None:
    s = spec(maxLatencyP95Ratio=2)
    slow, fast = stats(40, latency=(4.0,) * 40), stats(40, latency=(0.3,) * 40)
    breach = evaluate(s, LABELS, {"v1": fast, "v2": slow})
    assert breach is not None
    assert breach.metric == "latencyP95"
    assert breach.value > 2 * breach.control_value
    assert evaluate(s, LABELS, {"v1": stats(5, latency=(0.3,) * 5), "v2": slow}) is None
    assert evaluate(spec(), LABELS, {"v1": fast, "v2": slow}) is None  # no latency rule: latency ignored
    assert evaluate(spec(maxTtftP95Ratio=20), LABELS, {"v1": fast, "v2": slow}) is None


def test_control_is_explicit_or_the_largest_weight() -> None:
    assert spec().control() == "bot-v1"
    assert spec(control="bot-v2").control() == "bot-v2"
    # with v2 as control, v1 is the one judged
    breach = evaluate(spec(control="bot-v2"), LABELS, {"v1": stats(50, 50), "v2": stats(50)})
    assert breach is not None
    assert breach.model_version == "bot-v1"
    with pytest.raises(ValueError, match=r"autoRollback\.control"):
        spec(control="bot-v9")


def test_decide_fires_holds_for_the_generation_and_rearms() -> None:
    s = spec()
    bad = {"v1": stats(100), "v2": stats(40, 20)}
    armed = decide(s, 3, None, None, LABELS, {"v1": stats(100), "v2": stats(40)}, NOW)
    assert armed.effective == [{"modelVersion": "bot-v1", "weight": 90}, {"modelVersion": "bot-v2", "weight": 10}]
    assert armed.status == {"control": "bot-v1", "rolledBack": False}
    assert armed.condition is not None
    assert armed.condition[0] is False

    fired = decide(s, 3, None, armed.status, LABELS, bad, NOW)
    assert fired.fired is not None
    assert fired.effective == [{"modelVersion": "bot-v1", "weight": 100}, {"modelVersion": "bot-v2", "weight": 0}]
    assert fired.status is not None
    assert fired.status["rolledBack"]
    assert fired.status["generation"] == 3
    assert (fired.status["modelVersion"], fired.status["metric"], fired.status["value"]) == ("bot-v2", "errorRate", 0.5)
    assert fired.status["at"] == "2026-11-26T09:00:00Z"
    assert fired.condition == (True, "ErrorRateExceeded", fired.status["message"])
    assert "bot-v2 (v2)" in fired.status["message"]
    assert "control bot-v1" in fired.status["message"]

    held = decide(s, 3, None, fired.status, LABELS, {}, NOW)  # the window emptied: it stays rolled back
    assert held.effective == fired.effective
    assert held.fired is None
    assert not held.rearmed

    for generation, rearm in ((4, None), (3, "2026-11-26T10:00")):  # a new spec, or the annotation
        again = decide(s, generation, rearm, fired.status, LABELS, bad, NOW)
        assert again.rearmed
        assert again.fired is None
        assert again.effective == armed.effective
        assert again.status == {"control": "bot-v1", "rolledBack": False}


def test_no_rule_routes_by_the_spec() -> None:
    s = LoraAddonSpec.model_validate({"targets": [{"modelVersion": "bot-v1", "weight": 100}]})
    d = decide(s, 1, None, None, LABELS, {"v1": stats(100, 100)}, NOW)
    assert (d.effective, d.status, d.condition) == ([{"modelVersion": "bot-v1", "weight": 100}], None, None)
