"""What the operator's read of the routers costs, every autoscaler tick: GET /load (compact JSON) against the
Prometheus text of /metrics it replaced, at N Deployments with 10 addons each that have all had traffic (one
adapter version each, one request finished, one TTFT and one latency observation).

    .venv/bin/python bench/router_load_feed.py [--sizes 100,1000]

Prints, per N, the body sizes, the router's CPU to write each body, and the operator's CPU to read it (for
/metrics: prometheus-client's text parser over every sample, as the operator's reading did; for /load: the
model it is read with and the per-deployment and per-addon signals; /load?versions=1, asked for only while some
addon has a rollback rule, adds every version's counters, as if every addon had one), and the ratios. CPU
seconds of this process (time.process_time), one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loraserve.autoscale.signals import RouterLoad, addon_signals, deployment_signals
from loraserve.rollback import version_counters, versions_by_addon
from loraserve.router.metrics import RouterMetrics

ADDONS = 10


def router_with_traffic(n: int) -> RouterMetrics:
    metrics = RouterMetrics()
    now = time.time()
    for d in range(n):
        for a in range(ADDONS):
            series = metrics.series("team", f"d{d}", f"a{a}", "v1")
            series.finished(200)
            series.ttft.observe(0.2)
            series.duration.observe(1.5)
            series.last_request = now
    return metrics


def cpu(work: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.process_time()
    out = work()
    return time.process_time() - t0, out


def read_metrics(text: str) -> int:
    return sum(len(family.samples) for family in text_string_to_metric_families(text))


def read_load(body: bytes) -> int:
    loads = [RouterLoad.model_validate_json(body)]
    by_addon = versions_by_addon(loads)
    counters = sum(len(version_counters(rows)) for rows in by_addon.values())  # every addon with a rule
    return len(deployment_signals(loads)) + len(addon_signals(loads)) + counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="Deployments, comma-separated")
    args = parser.parse_args()
    print(f"{'N':>6} {'feed':16} {'body MB':>8} {'router CPU s':>13} {'operator CPU s':>15}")
    for n in (int(x) for x in args.sizes.split(",")):
        metrics = router_with_traffic(n)
        write_text, text = cpu(metrics.render)
        read_text, _ = cpu(lambda text=text: read_metrics(text.decode()))
        print(f"{n:>6} {'/metrics':16} {len(text) / 1e6:8.2f} {write_text:13.3f} {read_text:15.3f}")
        for feed, versions in (("/load", False), ("/load?versions=1", True)):
            write_load, body = cpu(lambda metrics=metrics, versions=versions: metrics.load(versions=versions))
            read_json, _ = cpu(lambda body=body: read_load(body))
            print(
                f"{n:>6} {feed:16} {len(body) / 1e6:8.2f} {write_load:13.3f} {read_json:15.3f}   /metrics over it: "
                f"body {len(text) / len(body):.0f}x, router {write_text / write_load:.0f}x, "
                f"operator {read_text / read_json:.0f}x"
            )


if __name__ == "__main__":
    main()
