"""Names and labels shared by the operator, the router and the CLI: one place, so they cannot drift."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

LABEL_DEPLOYMENT = "serving.loraserve.dev/deployment"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
MANAGED_BY = "loraserve"
MODEL_SERVER_PORT = 8000
MODEL_SERVER_PORT_NAME = "http"
KEEP_ANNOTATION = "serving.loraserve.dev/keep"
POOL_LABEL = "serving.loraserve.dev/serverless-pool"  # on the operator's serverless pool Deployments


def addon_deployment(addon: Mapping[str, Any]) -> str | None:
    """The Deployment serving a LoraAddon object: its spec.deployment, or for a serverless addon the pool the
    operator seated it in (status.deployment); None while a serverless addon is not seated yet."""
    for part in ("spec", "status"):
        section = addon.get(part)
        name = section.get("deployment") if isinstance(section, Mapping) else None
        if isinstance(name, str) and name:
            return name
    return None


def base_model_name(uri: str) -> str:
    """The model name clients use for a base model: the last path segment of its URI.

    hf://meta-llama/Llama-3.1-8B-Instruct -> Llama-3.1-8B-Instruct; pvc://models/llama/ -> llama.
    """
    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    return path.rsplit("/", 1)[-1]


def adapter_served_name(addon: str, version: str) -> str:
    """The name vLLM serves one version of an addon under: `<addon>-<version>`, e.g. support-bot-v2."""
    return f"{addon}-{version}"


def child_name(deployment: str) -> str:
    """Name of the apps/v1 Deployment and the Service made for a loraserve Deployment."""
    return deployment


def selector_labels(deployment: str) -> dict[str, str]:
    return {LABEL_DEPLOYMENT: deployment, LABEL_NAME: "loraserve-model-server"}


def service_url(deployment: str, namespace: str) -> str:
    return f"http://{child_name(deployment)}.{namespace}.svc:{MODEL_SERVER_PORT}"
