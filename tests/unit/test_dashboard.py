"""The chart's Grafana dashboard queries only metrics the code exports (router and operator)."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest
from e2e.dashboard import dashboard_metric_names, exported_names, expr_metric_names
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.metrics import MetricWrapperBase

import loraserve.handlers
from loraserve.router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "loraserve" / "dashboards" / "loraserve.json"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (namespace, deployment) (rate(loraserve_router_requests_total{code=~"5..", addon=""}[5m]))',
            {"loraserve_router_requests_total"},
        ),
        (
            'histogram_quantile(0.99, sum by (le, deployment) (rate(ttft_seconds_bucket{a=~"$a"}[$__rate_interval])))',
            {"ttft_seconds_bucket"},
        ),
        ("sum(rate(foo_sum[1m])) by (le) / sum(rate(foo_count[1m])) without (pod)", {"foo_sum", "foo_count"}),
        ("time() - max(last_seen_seconds > 0) offset 5m", {"last_seen_seconds"}),
        (
            "(a_total / ignoring (code) group_left b) or on (x) c unless d_count > bool 1e3 and e:recorded",
            {"a_total", "b", "c", "d_count", "e:recorded"},
        ),
        ('label_replace(up{job="x"}, "dst", "$1", "src", "(.*)")', {"up"}),
        ("increase(gpu_seconds_total[$__range]) / 3600 * $scale", {"gpu_seconds_total"}),
        ("vector(1)", set()),
    ],
)
def test_expr_metric_names(expr: str, names: set[str]) -> None:
    assert expr_metric_names(expr) == names


def test_dashboard_metric_names_reads_panels_rows_and_variables(tmp_path: Path) -> None:
    dashboard = {
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "rate(a_total[1m])"}, {"expr": "b"}]},
            {"type": "row", "collapsed": True, "panels": [{"targets": [{"expr": 'sum by (x) (c{y="z"})'}]}]},
            {"type": "text"},
        ],
        "templating": {
            "list": [
                {"type": "datasource", "query": "prometheus"},
                {"type": "query", "query": {"query": 'label_values(d{n=~"$n"}, deployment)'}},
                {"type": "query", "query": "label_values(e, namespace)"},
                {"type": "query", "query": "label_values(namespace)"},
            ]
        },
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dashboard))
    assert dashboard_metric_names(path) == {"a_total", "b", "c", "d", "e"}


def test_exported_names_are_sample_names() -> None:
    text = (
        '# TYPE x counter\nx_total{a="1"} 2\n'
        '# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 1\nh_sum 0.5\nh_count 1\n'
        "# TYPE g gauge\ng 3\n"
        "# TYPE empty gauge\n"
    )
    assert exported_names(text) == {"x_total", "h_bucket", "h_sum", "h_count", "g"}


def router_exposition() -> str:
    metrics = RouterMetrics()
    for addon in (None, "bot"):
        series = metrics.series("ns", "d", addon)
        series.accepted()
        series.ttft.observe(0.1)
        series.duration.observe(0.2)
        series.finished(200)
    metrics.reject(401)
    metrics.wake("ns", "d")
    return metrics.render().decode()


def touch_metrics(module: ModuleType) -> None:
    """One sample of every metric the module defines: a labelled metric without children exports no sample."""
    for value in vars(module).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labelnames = value._labelnames
        child = value.labels(*("x" for _ in labelnames)) if labelnames else value
        if isinstance(child, Counter):
            child.inc()
        elif isinstance(child, Gauge):
            child.set(1)
        elif isinstance(child, Histogram | Summary):
            child.observe(1.0)


def operator_exposition() -> str:
    for info in pkgutil.iter_modules(loraserve.handlers.__path__, "loraserve.handlers."):
        touch_metrics(importlib.import_module(info.name))
    return generate_latest(REGISTRY).decode()


def test_every_dashboard_metric_is_exported() -> None:
    used = dashboard_metric_names(DASHBOARD)
    # The extractor found the panels (an empty set would pass the subset check below trivially).
    assert {
        "loraserve_router_requests_total",
        "loraserve_router_time_to_first_token_seconds_bucket",
        "loraserve_router_request_duration_seconds_bucket",
        "loraserve_router_requests_in_flight",
        "loraserve_router_requests_held",
        "loraserve_deployment_replicas_desired",
        "loraserve_deployment_replicas_ready",
        "loraserve_gpu_seconds_total",
        "loraserve_adapter_loads_total",
        "loraserve_adapter_load_failures_total",
    } <= used
    exported = exported_names(router_exposition()) | exported_names(operator_exposition())
    assert used - exported == set()
