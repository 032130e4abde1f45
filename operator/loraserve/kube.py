"""The one place the operator talks to the Kubernetes API (besides Kopf itself): thin wrappers around
the official client, with server-side apply for the objects the operator owns."""

from __future__ import annotations

import json
import time
from typing import Any

from kubernetes import client, config

from loraserve.api.common import GROUP, VERSION
from loraserve.resources.model_server import SPEC_HASH_ANNOTATION

FIELD_MANAGER = "loraserve-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
# Objects the operator writes but may not read (Secrets) are written again this often, so one deleted by
# hand comes back without an operator restart.
REAPPLY_SECONDS = 600.0


# Kubernetes calls in flight at once: threads (the client is synchronous; see loraserve.operator_main) and
# connections. Python's default, min(32, CPUs + 4) threads and 5 connections per CPU, let a 2-CPU pod make
# 6 calls at a time, each waiting out the API server's latency: the limit of a burst of creates.
CALLS_IN_FLIGHT = 32
# ... and the addons' own threads (see loraserve.handlers.addon.kube_call): in a burst of creates their
# finalizers and status writes are thousands, and must not delay the calls that create a Deployment's pods.
ADDON_CALLS_IN_FLIGHT = 16
# ... and the Services' (see loraserve.handlers.deployment.SERVICE_THREADS).
SERVICE_CALLS_IN_FLIGHT = 4


def load_config() -> None:
    """In a pod: the service account. Elsewhere: KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


def _collection(group_version: str, namespace: str, plural: str) -> str:
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


def _custom(namespace: str, plural: str) -> str:
    return _collection(f"{GROUP}/{VERSION}", namespace, plural)


class Kube:
    """Requests by path through the client's ApiClient (its configuration, auth, TLS and connection pool),
    answers read as JSON. Not the client's typed API classes: importing them and the models they bring took
    30 MB of the operator's memory and four seconds of its event loop, for calls made here with a path and a
    dict."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        if api is None:
            # Not the process default: Kopf's login replaces that after the operator's startup handlers run.
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = CALLS_IN_FLIGHT + ADDON_CALLS_IN_FLIGHT + SERVICE_CALLS_IN_FLIGHT
            api = client.ApiClient(configuration)
        self.api: Any = api
        self._applied: dict[tuple[str, str, str, int], float] = {}  # owned objects written, and when

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        """The answer (urllib3's, unread), or ApiException with the API server's status and message."""
        headers = {"Accept": "application/json"} | ({"Content-Type": content_type} if content_type else {})
        request = self.api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request)
        if not 200 <= response.status <= 299:
            response.read()
            raise client.ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return _json(self._call("GET", path))
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _apply(self, collection: str, manifest: dict[str, Any]) -> None:
        """Server-side apply, the answer left undecoded: the operator reads its objects from watch events."""
        path = f"{collection}/{manifest['metadata']['name']}"
        _drain(self._call("PATCH", path, {"fieldManager": FIELD_MANAGER, "force": "true"}, manifest, APPLY))

    def get_deployment_child(self, name: str, namespace: str) -> dict[str, Any] | None:
        return self._get(f"{_collection('apps/v1', namespace, 'deployments')}/{name}")

    def get_service(self, name: str, namespace: str) -> dict[str, Any] | None:
        return self._get(f"{_collection('v1', namespace, 'services')}/{name}")

    def apply_deployment_child(self, manifest: dict[str, Any], live: dict[str, Any] | None) -> bool:
        """Server-side apply when the live object (as last seen) differs from what we want; True if written."""
        meta = manifest["metadata"]
        if live is not None:
            live_hash = (live["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
            if (
                live_hash == meta["annotations"][SPEC_HASH_ANNOTATION]
                and live["spec"].get("replicas") == manifest["spec"]["replicas"]
            ):
                return False
        self._apply(_collection("apps/v1", meta["namespace"], "deployments"), manifest)
        return True

    def apply_service(self, manifest: dict[str, Any]) -> bool:
        meta = manifest["metadata"]
        live = self.get_service(meta["name"], meta["namespace"])
        if live is not None and live["spec"].get("ports") and _same_ports(live, manifest):
            return False
        self._apply(_collection("v1", meta["namespace"], "services"), manifest)
        return True

    def apply_secret(self, manifest: dict[str, Any]) -> bool:
        """Server-side apply of a Secret the operator owns. The operator may create and patch Secrets but never
        read them (no get, list or watch), so it writes each once per process instead of comparing."""
        return self._apply_once(manifest, _collection("v1", manifest["metadata"]["namespace"], "secrets"))

    def apply_network_policy(self, manifest: dict[str, Any]) -> bool:
        namespace = manifest["metadata"]["namespace"]
        return self._apply_once(manifest, _collection("networking.k8s.io/v1", namespace, "networkpolicies"))

    def _apply_once(self, manifest: dict[str, Any], collection: str) -> bool:
        meta = manifest["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"], hash(json.dumps(manifest, sort_keys=True)))
        if time.monotonic() - self._applied.get(key, -REAPPLY_SECONDS) < REAPPLY_SECONDS:
            return False
        self._apply(collection, manifest)
        self._applied[key] = time.monotonic()
        return True

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        return self.list_pods_versioned(namespace, selector)[0]

    def list_pods_versioned(self, namespace: str, selector: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
        """The pods and the list's resourceVersion (to merge with watch events that came meanwhile)."""
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
        listed = _json(self._call("GET", _collection("v1", namespace, "pods"), {"labelSelector": label_selector}))
        version = str(listed["metadata"].get("resourceVersion") or "0")
        return list(listed.get("items") or []), int(version) if version.isdigit() else 0

    def get_custom(self, plural: str, name: str, namespace: str) -> dict[str, Any] | None:
        return self._get(f"{_custom(namespace, plural)}/{name}")

    def create_custom(self, plural: str, namespace: str, body: dict[str, Any]) -> None:
        _drain(self._call("POST", _custom(namespace, plural), body=body))

    def delete_custom(self, plural: str, name: str, namespace: str) -> None:
        _drain(self._call("DELETE", f"{_custom(namespace, plural)}/{name}"))

    def patch_custom(self, plural: str, name: str, namespace: str, body: dict[str, Any]) -> int:
        """Returns the object's generation after the patch."""
        patched = _json(self._call("PATCH", f"{_custom(namespace, plural)}/{name}", body=body, content_type=MERGE))
        return int(patched["metadata"].get("generation") or 0)

    def set_finalizers(
        self, plural: str, name: str, namespace: str, finalizers: list[str], resource_version: str
    ) -> None:
        """Only onto the version they were read from (409 Conflict else): another controller's finalizer, added
        or removed meanwhile, is never undone."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        _drain(self._call("PATCH", f"{_custom(namespace, plural)}/{name}", body=body, content_type=MERGE))

    def patch_custom_status(self, plural: str, name: str, namespace: str, body: dict[str, Any]) -> None:
        # The answer (the whole object) is not decoded: the watch brings the write back.
        _drain(self._call("PATCH", f"{_custom(namespace, plural)}/{name}/status", body=body, content_type=MERGE))

    def scale_custom(self, plural: str, name: str, namespace: str, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        _drain(self._call("PATCH", f"{_custom(namespace, plural)}/{name}/scale", body=body, content_type=MERGE))


def _json(response: Any) -> dict[str, Any]:
    """The API server's JSON as plain dicts (the same shape as Kopf's watch events), not the client's models."""
    result: dict[str, Any] = json.loads(response.data)
    return result


def _drain(response: Any) -> None:
    """Read an answer to its end (its connection goes back to the pool) without decoding it."""
    response.data  # noqa: B018  (reading is the point)
    response.release_conn()


def _same_ports(live: dict[str, Any], manifest: dict[str, Any]) -> bool:
    def key(svc: dict[str, Any]) -> list[tuple[Any, ...]]:
        return sorted((p.get("name"), p.get("port"), str(p.get("targetPort"))) for p in svc["spec"]["ports"])

    return key(live) == key(manifest) and live["spec"].get("selector") == manifest["spec"]["selector"]


def api_error_text(exc: client.ApiException) -> str:
    """`403 Forbidden: deployments.serving.loraserve.dev is forbidden: ... cannot create resource ...`: the API
    server's own words, for logs and status (a Status body's message; the reason alone says too little)."""
    message = ""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict):
            message = str(body.get("message") or "")
    except (TypeError, ValueError):
        pass
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")
