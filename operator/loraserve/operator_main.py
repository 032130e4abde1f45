"""Runs the operator: `loraserve operator [--namespace NS ...]` (any kubeconfig, or in-cluster)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf

from loraserve import peering
from loraserve.handlers import addon, autoscaler, deployment, modelversion  # noqa: F401  (registers the handlers)
from loraserve.handlers.deployment import MODEL_SERVER, model_server_tokens
from loraserve.kube import CALLS_IN_FLIGHT, load_config
from loraserve.settings import OperatorSettings, operator_settings, use_settings

PEERING_NAME = "loraserve"
LIST_PAGE = 500  # objects per page of Kopf's listings


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    load_config()
    if not model_server_tokens().enabled:  # read (and checked) by run() before Kopf starts
        logging.getLogger(__name__).warning(
            "no LORASERVE_MODEL_SERVER_KEY_FILE: model servers accept requests from anyone who reaches them"
        )
    # Two replicas must never both act: Kopf peering lets only the highest priority operate, the eldest
    # replica (see loraserve.peering); a killed one is replaced within the keep-alive lifetime.
    settings.peering.name = PEERING_NAME
    settings.peering.priority = peering.priority(time.time(), random.randrange(2**peering.TIEBREAK_BITS))
    settings.peering.lifetime = operator_settings().peering_lifetime
    # Start paused until the peers are read: a replica (re)starting beside a leader never acts meanwhile.
    settings.peering.mandatory = not settings.peering.standalone
    if settings.peering.mandatory:  # Kopf logs "Resuming operations" once this replica acts
        logging.getLogger(__name__).info(
            f"peering {PEERING_NAME!r} (lifetime {settings.peering.lifetime}s): {peering.STANDING_BY}"
        )
    settings.posting.level = logging.INFO
    watch_only_model_servers(settings)
    settings.persistence.finalizer = "serving.loraserve.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="serving.loraserve.dev")
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(prefix="serving.loraserve.dev")
    # A stopped daemon that ends within this (a Deployment's loop finishing its look) lets Kopf remove the
    # finalizer in the same pass; else Kopf looks again only after the daemon's cancellation backoff.
    settings.background.instant_exit_timeout = 5.0
    settings.watching.server_timeout = 300
    # Kopf lists each kind when it starts, and again when a watch resumes too late (410 Gone: under load the
    # API server's watch cache keeps only the last minutes). In one response, 10,000 addons were 30 MB of JSON
    # and every object decoded at once, held for the 4 minutes the busy operator took to read and hand them on
    # at 1,000 Deployments: its memory high-water mark. In pages, one response is decoded at a time.
    settings.watching.chunk_size = LIST_PAGE
    settings.networking.request_timeout = 30


class QuietWatchHandlers(logging.Filter):
    """Kopf logs "Handler 'x' succeeded." at INFO for every watch event an event handler sees (several per
    object change, the operator's busiest log line by far at scale): shown only with --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not isinstance(record.msg, str):
            return True
        return not (record.msg.startswith("Handler '") and record.msg.endswith("' succeeded."))


# The kinds with change-detecting handlers (on.create, on.resume: see loraserve.handlers.modelversion), the only
# ones whose essence Kopf compares; a unit test checks this against the handlers registered.
CHANGE_DETECTED_KINDS = frozenset({"ModelVersion"})


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """Kopf's essence of an object (spec, labels, annotations), built only for the kinds whose changes a
    handler detects (CHANGE_DETECTED_KINDS), and without deep-copying what it then throws away. Kopf built it,
    twice deep-copied, on every watch event of every kind (a pod's status and managedFields included), which
    was an eighth of the operator's event loop at 1,000 Deployments; for the other kinds nothing reads it.
    Same essence, same annotation."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        if body.get("kind") not in CHANGE_DETECTED_KINDS:
            return None  # Kopf's diff of None and None: nothing changed, no cause (none is looked for)
        if extra_fields:  # a handler watching a status field would need the whole body (none does)
            return super().build(body=body, extra_fields=extra_fields)
        metadata = body.get("metadata") or {}
        trimmed = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        # what Kopf's essence and its annotation naming read of the metadata
        trimmed["metadata"] = {k: metadata[k] for k in ("labels", "annotations", "ownerReferences") if k in metadata}
        return super().build(body=kopf.Body(cast(kopf.RawBody, trimmed)), extra_fields=extra_fields)


def watch_only_model_servers(settings: kopf.OperatorSettings) -> None:
    """Server-side label selectors: the operator reads the model servers' pods and apps/v1 Deployments only.
    A handler's `labels=` filter alone is applied after Kopf has read every pod of the cluster (and kept a
    memory of each)."""
    selector = ",".join(f"{k}={v}" for k, v in MODEL_SERVER.items())
    settings.watching.label_selectors["v1", "pods"] = selector
    settings.watching.label_selectors["apps", "deployments"] = selector


def run(namespaces: list[str] | None = None, standalone: bool = False, liveness: str | None = None) -> None:
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("kopf.objects").addFilter(QuietWatchHandlers())
    try:  # a bad setting stops the start with its reason (Kopf would retry a failing startup handler forever)
        use_settings(OperatorSettings.from_env())
        model_server_tokens()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"loraserve operator cannot start: {exc}") from None
    # What the imports made (Kopf, the Kubernetes client's models, pydantic: about 250,000 objects) lives as
    # long as the process: out of the garbage collector's sight, each full collection no longer scans it. With
    # it, a full collection paused the event loop for most of a second at 300 Deployments, seconds at 1,000.
    gc.collect()
    gc.freeze()
    asyncio.run(_operate(namespaces, standalone, liveness))


# How often what the allocator holds free goes back to the system (see _give_back_freed_memory).
TRIM_SECONDS = 60.0


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return cast(Callable[[int], int], ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim)
    except (AttributeError, OSError):
        return None


async def _give_back_freed_memory(every: float) -> None:
    """Each watch event is a JSON document decoded into fresh dicts and strings; glibc keeps the memory a
    burst of them freed in its heaps, where only the top of a heap is ever returned: the operator's RSS stayed
    at its high-water mark. malloc_trim returns the free pages of every heap (at 300 Deployments after their
    creation: 187 MB -> 151 MB, in 9 ms, off the event loop)."""
    trim = malloc_trim()
    while trim is not None:
        await asyncio.sleep(every)
        await asyncio.to_thread(trim, 0)


async def _operate(namespaces: list[str] | None, standalone: bool, liveness: str | None) -> None:
    # The handlers' Kubernetes calls run in the loop's default executor (asyncio.to_thread).
    executor = ThreadPoolExecutor(max_workers=CALLS_IN_FLIGHT, thread_name_prefix="kube")
    asyncio.get_running_loop().set_default_executor(executor)
    trimming = asyncio.create_task(_give_back_freed_memory(TRIM_SECONDS))
    try:
        await kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces or [],
            standalone=standalone,
            liveness_endpoint=liveness,
        )
    finally:
        trimming.cancel()
