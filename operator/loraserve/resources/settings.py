"""Operator-wide settings that shape the manifests (images, label keys). Read from the environment once."""

from __future__ import annotations

import os
from dataclasses import dataclass

from loraserve import __version__


@dataclass(frozen=True)
class ManifestSettings:
    model_server_image: str = f"loraserve/model-server:{__version__}"
    accelerator_label: str = "serving.loraserve.dev/accelerator"
    region_label: str = "topology.kubernetes.io/region"
    fetcher_port: int = 8001
    # How long a replica may take to load weights before Kubernetes restarts it (startup probe).
    startup_seconds: int = 1800
    # Model servers demand their Deployment's token (vLLM --api-key via VLLM_API_KEY, the fetcher) when the
    # operator holds the install key (see loraserve.tokens).
    model_server_auth: bool = False
    # Where the operator and router run: model-server pods take ingress from there only (NetworkPolicy).
    control_plane_namespace: str | None = None
    # A replica going away first waits this long for the router to see it leave (EndpointSlice watch), then
    # up to drain_seconds for the requests it already has to finish, before vLLM gets SIGTERM.
    drain_settle_seconds: int = 5
    drain_seconds: int = 90
    # The fetcher's own settings (LORASERVE_FETCH_*: allow-list, size limits, CA), passed on to its containers.
    fetch_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ManifestSettings:
        env = dict(os.environ) if env is None else env
        default = cls()
        return cls(
            model_server_image=env.get("LORASERVE_MODEL_SERVER_IMAGE", default.model_server_image),
            accelerator_label=env.get("LORASERVE_ACCELERATOR_LABEL", default.accelerator_label),
            region_label=env.get("LORASERVE_REGION_LABEL", default.region_label),
            model_server_auth=bool(env.get("LORASERVE_MODEL_SERVER_KEY_FILE")),
            control_plane_namespace=env.get("LORASERVE_CONTROL_PLANE_NAMESPACE") or None,
            drain_seconds=_seconds(env, "LORASERVE_DRAIN_SECONDS", default.drain_seconds),
            fetch_env=tuple(sorted((k, v) for k, v in env.items() if k.startswith("LORASERVE_FETCH_"))),
        )


def _seconds(env: dict[str, str], key: str, default: int) -> int:
    text = env.get(key, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{key}: a positive whole number of seconds, got {text!r}")
    return int(text)
