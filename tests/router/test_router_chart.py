"""The chart's router settings, rendered by the real helm (`helm template`, no cluster needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from loraserve.local.cluster import find_bin_dir

CHART = Path(__file__).resolve().parents[2] / "charts" / "loraserve"


def render(*sets: str) -> list[dict[str, Any]]:
    args = [str(find_bin_dir() / "helm"), "template", "ls", str(CHART), "-n", "sys"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return dict(find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0])


def test_metrics_on_the_api_port_by_default() -> None:
    docs = render()
    router = container(docs, "ls-router")
    assert not any(a.startswith("--metrics-port") for a in router["args"])
    service = find(docs, "Service", "ls-router-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "http"}]
    env = {e["name"]: e.get("value") for e in container(docs, "ls-operator")["env"]}
    assert env["LORASERVE_ROUTER_METRICS_SERVICE"] == "ls-router.sys:8080"


def test_metrics_port_moves_every_scraper_with_it() -> None:
    docs = render("router.metricsPort=9091", "router.extraArgs={--max-connections=20000,--idle-timeout=30}")
    router = container(docs, "ls-router")
    assert "--metrics-port=9091" in router["args"]
    assert {"--max-connections=20000", "--idle-timeout=30"} <= set(router["args"])
    assert {"name": "metrics", "containerPort": 9091} in router["ports"]
    service = find(docs, "Service", "ls-router-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9091, "targetPort": "metrics"}]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9091"
    env = {e["name"]: e.get("value") for e in container(docs, "ls-operator")["env"]}
    assert env["LORASERVE_ROUTER_METRICS_SERVICE"] == "ls-router.sys:9091"  # the autoscaler's input


def test_bad_router_values_are_refused() -> None:
    args = [str(find_bin_dir() / "helm"), "template", "ls", str(CHART), "--set", "router.extraArgs={max-connections}"]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    assert out.returncode != 0
    assert "extraArgs" in out.stderr
