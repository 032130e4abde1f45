"""`loraserve` command line: run the operator (more commands: the CLI issue)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve", description="loraserve: fine-tuned LLMs on Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True)
    op = sub.add_parser("operator", help="run the operator against the current kubeconfig or in-cluster")
    op.add_argument("--namespace", "-n", action="append", default=[], help="watch only these (default: all)")
    op.add_argument("--standalone", action="store_true", help="no peering (a single operator, e.g. local runs)")
    op.add_argument("--liveness", default=None, help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    op.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "operator":
        from loraserve.operator_main import run

        if args.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port)
        run(args.namespace, args.standalone, args.liveness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
