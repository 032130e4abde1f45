"""The e2e suite's fixtures: a real control plane, the chart installed with helm, the operator and router
running as the chart's ServiceAccounts (see e2e/harness.py), model-server pods really running vLLM for CPU.

At the end the suite prints one line counting the checks that passed, and the timing table its tests filled.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fixtures.vllm_server import vllm_python

from e2e.harness import RUN_REGION, RUN_TOLERATION, Product
from loraserve.local.cluster import LocalCluster

# Shortened windows, served to the serverless pool by the chart's own value (operator.serverlessPool).
SERVERLESS_POOL = {
    "region": RUN_REGION,
    "tolerations": [RUN_TOLERATION],
    "extraArgs": ["--max-model-len=256", "--dtype=float32"],
    "maxLoraRank": 16,
}
TIMINGS: dict[str, float] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.cluster)  # and real vLLM: `-m "not cluster"` leaves them out
            item.add_marker(pytest.mark.vllm)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    def ours(outcome: str) -> int:
        reports = terminalreporter.stats.get(outcome, [])
        return sum(1 for r in reports if getattr(r, "when", "") == "call" and r.nodeid.startswith("e2e/"))

    passed, failed = ours("passed"), ours("failed")
    if passed + failed == 0:
        return
    terminalreporter.write_line(f"e2e: {passed} of {passed + failed} checks passed (chart ServiceAccounts, real vLLM)")
    if TIMINGS:
        terminalreporter.write_line(f"{'e2e timing':<66} {'seconds':>8}")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:<66} {seconds:>8.2f}")


@pytest.fixture(scope="session")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    if os.environ.get("LORASERVE_E2E_KUBECONFIG"):
        pytest.fail(
            "LORASERVE_E2E_KUBECONFIG (kind/GPU clusters): the chart's pods run there and model files must be "
            "reachable by URI; this suite runs on the local runtime only for now (see e2e/kind/README.md)"
        )
    workdir = tmp_path_factory.mktemp("e2e")
    cluster = LocalCluster(workdir / "cluster")
    cluster.start()
    product = Product(cluster, workdir, vllm_python(), set_values=[f"operator.serverlessPool={_json(SERVERLESS_POOL)}"])
    try:
        product.install()
        yield product
    finally:
        product.stop_processes()
        cluster.stop()
        shutil.rmtree(workdir / "pods", ignore_errors=True)


def _json(value: object) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))


@pytest.fixture(scope="session")
def user_namespace(product: Product) -> str:
    name = f"team-{uuid.uuid4().hex[:6]}"
    product.cluster.kubectl("create", "namespace", name)
    return name
