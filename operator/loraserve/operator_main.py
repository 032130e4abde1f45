"""Runs the operator: `loraserve operator [--namespace NS ...]` (any kubeconfig, or in-cluster)."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import kopf

from loraserve.handlers import addon, autoscaler, deployment, modelversion  # noqa: F401  (registers the handlers)
from loraserve.handlers.deployment import model_server_tokens
from loraserve.kube import load_config
from loraserve.settings import OperatorSettings, use_settings

PEERING_NAME = "loraserve"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    load_config()
    if not model_server_tokens().enabled:  # read (and checked) by run() before Kopf starts
        logging.getLogger(__name__).warning(
            "no LORASERVE_MODEL_SERVER_KEY_FILE: model servers accept requests from anyone who reaches them"
        )
    # Two replicas must never both act: Kopf peering lets only the highest priority operate; a random
    # priority makes the winner unique without configuration.
    settings.peering.name = PEERING_NAME
    settings.peering.priority = random.randint(1, 2**31 - 1)
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = "serving.loraserve.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="serving.loraserve.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="serving.loraserve.dev")
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30


def run(namespaces: list[str] | None = None, standalone: bool = False, liveness: str | None = None) -> None:
    try:  # a bad setting stops the start with its reason (Kopf would retry a failing startup handler forever)
        use_settings(OperatorSettings.from_env())
        model_server_tokens()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"loraserve operator cannot start: {exc}") from None
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces or [],
            standalone=standalone,
            liveness_endpoint=liveness,
        )
    )
