"""`loraserve`: the firectl-like verbs (`commands`) and `loraserve operator`, which runs the operator.

`python -m loraserve.cli.main` and the `loraserve` console script are the same entry point. The operator's
flags are the ones the Helm chart renders (`operator --liveness=... --metrics-port=... --namespace=...`).
"""

from __future__ import annotations

import logging
import sys

import click

from loraserve.cli import local as _local  # noqa: F401 - registers `loraserve local`
from loraserve.cli import manifests
from loraserve.cli.commands import CliError, ExitCode, api_error, cli, refused
from loraserve.cli.kubeclient import KubeError


@cli.command("operator")
@click.option(
    "--namespace", "-n", "namespaces", multiple=True, metavar="NAMESPACE", help="watch only these (default: all)"
)
@click.option("--standalone", is_flag=True, help="no peering (a single operator, e.g. local runs)")
@click.option("--liveness", default=None, help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
@click.option("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
@click.option("--verbose", "-v", is_flag=True)
def operator_command(
    namespaces: tuple[str, ...], standalone: bool, liveness: str | None, metrics_port: int, verbose: bool
) -> None:
    """Run the operator against the current kubeconfig or in-cluster."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from loraserve.operator_main import run

    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    run(list(namespaces), standalone, liveness)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (`commands.ExitCode`)."""
    try:
        code = cli.main(args=argv, prog_name="loraserve", standalone_mode=False)
    except manifests.Refused as exc:
        error = refused(exc)
    except KubeError as exc:
        error = api_error(exc)
    except CliError as exc:
        error = exc
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    else:
        return int(code or 0)
    error.show()
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
