"""The apps/v1 Deployment and Service that run vLLM for one loraserve Deployment.

Pure: everything is decided from the CR (and, for live merge, its ModelVersion) and returned as dicts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import urlparse

from loraserve.api.deployment import AcceleratorType, DeploymentSpec
from loraserve.api.modelversion import ModelVersionSpec
from loraserve.api.naming import (
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGED_BY,
    MODEL_SERVER_PORT,
    MODEL_SERVER_PORT_NAME,
    base_model_name,
    child_name,
    selector_labels,
)
from loraserve.merge.pin import pinned_base
from loraserve.resources.settings import ManifestSettings
from loraserve.tokens import TOKEN_KEY, token_secret_name

GPU_RESOURCE = {
    AcceleratorType.NVIDIA_A100_80GB: "nvidia.com/gpu",
    AcceleratorType.NVIDIA_H100_80GB: "nvidia.com/gpu",
    AcceleratorType.AMD_MI300X_192GB: "amd.com/gpu",
}
SPEC_HASH_ANNOTATION = "serving.loraserve.dev/spec-hash"
MODELS_DIR = "/models"
ADAPTERS_DIR = "/adapters"
BASE_DIR = f"{MODELS_DIR}/base"
MERGED_DIR = f"{MODELS_DIR}/merged"
HF_TOKEN_KEY = "HF_TOKEN"
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def served_model_name(name: str, spec: DeploymentSpec) -> str:
    """What clients put before `#`: the base model's name, or for live merge the deployment's own name."""
    if spec.base_model is not None:
        return base_model_name(spec.base_model)
    return name


def desired_replicas(spec: DeploymentSpec) -> int:
    """Replicas the child should have: the autoscaler's choice (spec.replicas), kept within [min, max]."""
    wanted = spec.replicas if spec.replicas is not None else spec.min_replicas
    return max(spec.min_replicas, min(wanted, spec.effective_max_replicas))


def _labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: "model-server",
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def _credential_env(spec: DeploymentSpec) -> list[dict[str, Any]]:
    """Model-source credentials straight from the Secret: the value never passes through the operator."""
    if spec.credentials_secret is None:
        return []
    keys = [HF_TOKEN_KEY, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"]
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": spec.credentials_secret, "key": key, "optional": True}}}
        for key in keys
    ]


def _is_on_node(uri: str) -> bool:
    return urlparse(uri).scheme == "file"


def _local_path(uri: str) -> str:
    return urlparse(uri).path


def _token_env(name: str, env_name: str, settings: ManifestSettings) -> list[dict[str, Any]]:
    """The Deployment's model-server token, straight from its Secret (never in args, the CR or logs)."""
    if not settings.model_server_auth:
        return []
    return [{"name": env_name, "valueFrom": {"secretKeyRef": {"name": token_secret_name(name), "key": TOKEN_KEY}}}]


def vllm_args(name: str, spec: DeploymentSpec, model_dir: str) -> list[str]:
    args = [
        f"--model={model_dir}",
        f"--served-model-name={served_model_name(name, spec)}",
        "--host=0.0.0.0",
        f"--port={MODEL_SERVER_PORT}",
        f"--tensor-parallel-size={spec.effective_accelerator_count}",
    ]
    if spec.enable_addons:
        args += ["--enable-lora", f"--max-loras={spec.effective_max_loras}", f"--max-lora-rank={spec.max_lora_rank}"]
    return args + list(spec.extra_args)


def drain_command(settings: ManifestSettings) -> list[str]:
    return [
        "loraserve-fetch",
        "drain",
        f"--port={MODEL_SERVER_PORT}",
        f"--settle={settings.drain_settle_seconds}",
        f"--timeout={settings.drain_seconds}",
    ]


def termination_grace_seconds(settings: ManifestSettings) -> int:
    # The preStop drain, then vLLM's own shutdown after SIGTERM (30 s: it frees the GPU and exits).
    return settings.drain_settle_seconds + settings.drain_seconds + 30


def _user_env(spec: DeploymentSpec) -> list[dict[str, Any]]:
    return [e.to_wire() for e in spec.env]


def _fetch_container(
    name: str, source_uri: str, dest: str, spec: DeploymentSpec, settings: ManifestSettings, digest: str | None = None
) -> dict[str, Any]:
    args = ["fetch", f"--uri={source_uri}", f"--dest={dest}"]
    if digest:
        args.append(f"--digest={digest}")
    return {
        "name": name,
        "image": settings.model_server_image,
        "command": ["loraserve-fetch"],
        "args": args,
        "env": [
            *_credential_env(spec),
            {"name": "HF_HOME", "value": "/cache/hf"},
            *({"name": k, "value": v} for k, v in settings.fetch_env),
        ],
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "adapters", "mountPath": ADAPTERS_DIR},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def build_pod_template(
    name: str, spec: DeploymentSpec, settings: ManifestSettings, merge_source: ModelVersionSpec | None = None
) -> dict[str, Any]:
    """The pod: optional init steps (fetch base, merge adapter), vLLM, and the adapter fetcher sidecar."""
    volumes: list[dict[str, Any]] = [
        {"name": "models", "emptyDir": {}},
        {"name": "adapters", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        # vLLM's tensor-parallel workers share memory through /dev/shm.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    init: list[dict[str, Any]] = []
    base_uri = spec.base_model if merge_source is None else merge_source.base_model.name
    if base_uri is None:
        raise ValueError("a live-merge deployment needs its ModelVersion")
    base_digest: str | None = None
    if merge_source is not None:  # the merge starts from the exact base the ModelVersion pins
        pinned = pinned_base(base_uri, merge_source.base_model.revision)
        base_uri, base_digest = pinned.uri, pinned.digest
    if _is_on_node(base_uri):
        model_dir = _local_path(base_uri)
    elif base_uri.startswith("pvc://"):
        claim, _, sub_path = base_uri.removeprefix("pvc://").partition("/")
        volumes[0] = {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        model_dir = f"{MODELS_DIR}/{sub_path}".rstrip("/")
    else:
        init.append(_fetch_container("fetch-base-model", base_uri, BASE_DIR, spec, settings, base_digest))
        model_dir = BASE_DIR
    if merge_source is not None:
        if base_uri.startswith("pvc://"):
            # The claim is read-only; merged weights go to a scratch volume.
            volumes.append({"name": "merged", "emptyDir": {}})
        merged_dir = MERGED_DIR if not base_uri.startswith("pvc://") else "/merged"
        merge = _fetch_container("merge-adapter", merge_source.adapter.uri, merged_dir, spec, settings)
        merge["args"] = [
            "merge",
            f"--base={model_dir}",
            f"--adapter-uri={merge_source.adapter.uri}",
            f"--out={merged_dir}",
            *([f"--digest={merge_source.adapter.digest}"] if merge_source.adapter.digest else []),
            *([f"--base-digest={base_digest}"] if base_digest else []),
        ]
        # the merge's refusal ("MergeFailed: ...", its last log line) becomes the container's termination message
        merge["terminationMessagePolicy"] = "FallbackToLogsOnError"
        if base_uri.startswith("pvc://"):
            merge["volumeMounts"].append({"name": "merged", "mountPath": merged_dir})
        init.append(merge)
        model_dir = merged_dir

    env = [
        *_credential_env(spec),
        {"name": "HF_HOME", "value": "/cache/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True" if spec.enable_addons else "False"},
        *(
            [{"name": "LORASERVE_SYSTEM_PROMPT", "value": merge_source.system_prompt}]
            if merge_source and merge_source.system_prompt
            else []
        ),
        *_user_env(spec),
        *_token_env(name, "VLLM_API_KEY", settings),  # vLLM's --api-key: /v1/* demands it
    ]
    gpu = GPU_RESOURCE[spec.accelerator_type]
    count = spec.effective_accelerator_count
    requests: dict[str, Any] = {gpu: count}
    limits: dict[str, Any] = {gpu: count}
    if spec.resources is not None:
        if spec.resources.requests is not None:
            requests.update(spec.resources.requests.to_wire())
        if spec.resources.limits is not None:
            limits.update(spec.resources.limits.to_wire())
    probe_get = {"path": "/health", "port": MODEL_SERVER_PORT_NAME}
    mounts = [
        {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
        {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True},
        {"name": "cache", "mountPath": "/cache"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if merge_source is not None and base_uri.startswith("pvc://"):
        mounts.append({"name": "merged", "mountPath": "/merged", "readOnly": True})
    vllm = {
        "name": "vllm",
        "image": settings.model_server_image,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": vllm_args(name, spec, model_dir),
        "env": env,
        "ports": [{"name": MODEL_SERVER_PORT_NAME, "containerPort": MODEL_SERVER_PORT, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "startupProbe": {"httpGet": probe_get, "periodSeconds": 10, "failureThreshold": settings.startup_seconds // 10},
        "readinessProbe": {"httpGet": probe_get, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": probe_get, "periodSeconds": 15, "failureThreshold": 4},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
        # Going away: the pod leaves the EndpointSlice as this starts; wait for the router to see that, then
        # for the requests vLLM already has, and only then does vLLM get SIGTERM.
        "lifecycle": {"preStop": {"exec": {"command": drain_command(settings)}}},
    }
    containers = [vllm]
    if spec.enable_addons:
        fetcher = _fetch_container("adapter-fetcher", "", ADAPTERS_DIR, spec, settings)
        fetcher["args"] = ["serve", f"--dir={ADAPTERS_DIR}", f"--port={settings.fetcher_port}"]
        fetcher["env"] = [*fetcher["env"], *_token_env(name, "LORASERVE_MODEL_SERVER_TOKEN", settings)]
        fetcher["ports"] = [{"name": "fetcher", "containerPort": settings.fetcher_port, "protocol": "TCP"}]
        fetcher["readinessProbe"] = {"httpGet": {"path": "/health", "port": "fetcher"}, "periodSeconds": 5}
        fetcher["volumeMounts"] = [
            {"name": "adapters", "mountPath": ADAPTERS_DIR},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
        containers.append(fetcher)
    node_selector = {settings.accelerator_label: spec.accelerator_type.value}
    if spec.region:
        node_selector[settings.region_label] = spec.region
    return {
        "metadata": {"labels": _labels(name)},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": termination_grace_seconds(settings),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "nodeSelector": node_selector,
            "tolerations": [
                {"key": gpu, "operator": "Exists", "effect": "NoSchedule"},
                *(t.to_wire() for t in spec.tolerations),
            ],
            "initContainers": init,
            "containers": containers,
            "volumes": volumes,
        },
    }


def spec_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def build_deployment(
    name: str,
    namespace: str,
    uid: str,
    spec: DeploymentSpec,
    settings: ManifestSettings,
    merge_source: ModelVersionSpec | None = None,
) -> dict[str, Any]:
    template = build_pod_template(name, spec, settings, merge_source)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": child_name(name),
            "namespace": namespace,
            "labels": _labels(name),
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(template)},
            "ownerReferences": [owner_reference("Deployment", name, uid)],
        },
        "spec": {
            "replicas": desired_replicas(spec),
            "selector": {"matchLabels": selector_labels(name)},
            # Never drop ready capacity during a rollout: one extra replica at a time.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def build_service(
    name: str, namespace: str, uid: str, spec: DeploymentSpec, settings: ManifestSettings
) -> dict[str, Any]:
    # Only vLLM's port: the fetcher is reached by the operator at each pod's IP, never through the Service.
    ports = [{"name": MODEL_SERVER_PORT_NAME, "port": MODEL_SERVER_PORT, "targetPort": MODEL_SERVER_PORT_NAME}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(name),
            "namespace": namespace,
            "labels": _labels(name),
            "ownerReferences": [owner_reference("Deployment", name, uid)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": ports,
            # Endpoints of not-yet-ready pods are still published (ready=false) so the router sees them coming.
            "publishNotReadyAddresses": False,
        },
    }


def build_token_secret(name: str, namespace: str, uid: str, token: str) -> dict[str, Any]:
    """The Secret the model-server pods read their token from; owned by the CR, so it goes with it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": token_secret_name(name),
            "namespace": namespace,
            "labels": _labels(name),
            "ownerReferences": [owner_reference("Deployment", name, uid)],
        },
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def build_network_policy(name: str, namespace: str, uid: str, settings: ManifestSettings) -> dict[str, Any] | None:
    """Model-server pods take ingress from the operator and router pods only (the token is the first wall)."""
    if settings.control_plane_namespace is None:
        return None
    peers = [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.control_plane_namespace}},
            "podSelector": {
                "matchExpressions": [
                    {"key": LABEL_NAME, "operator": "In", "values": ["loraserve-operator", "loraserve-router"]}
                ]
            },
        }
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{child_name(name)}-model-server",
            "namespace": namespace,
            "labels": _labels(name),
            "ownerReferences": [owner_reference("Deployment", name, uid)],
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": peers,
                    "ports": [
                        {"protocol": "TCP", "port": MODEL_SERVER_PORT},
                        {"protocol": "TCP", "port": settings.fetcher_port},
                    ],
                }
            ],
        },
    }
