"""The CLI's and the SDK's only Kubernetes I/O: the three CRDs through the official client's CustomObjectsApi.

Connection as kubectl makes it: `--kubeconfig` (else $KUBECONFIG, else ~/.kube/config; in a pod without
either, the service account), `--context`, and the namespace from `-n`, else the context's, else `default`.
API errors become `KubeError` with the HTTP status and the apiserver's `Status` body.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch

from loraserve.api.common import GROUP, VERSION

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
APPLY = "application/apply-patch+yaml"


class KubeError(Exception):
    """An API call that failed: `status` is the HTTP status (0 when the apiserver was not reached)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


def _error(exc: client.ApiException) -> KubeError:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("message") or exc.reason or exc)
    return KubeError(int(exc.status or 0), message, body)


class KubeClient:
    """Namespaced reads and writes of loraserve CRs (plural: deployments, loraaddons, modelversions)."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> None:
        self.api, default_namespace = _connect(kubeconfig, context)
        if not self.api.configuration.verify_ssl:
            # The kubeconfig asks for it (insecure-skip-tls-verify); kubectl does not warn on each request either.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self.namespace = namespace or default_namespace
        self.custom: Any = client.CustomObjectsApi(self.api)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.custom, method)(*args, **kwargs)
        except client.ApiException as exc:
            raise _error(exc) from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise KubeError(0, f"cannot reach the Kubernetes API: {exc}") from None

    def get(self, plural: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "get_namespaced_custom_object", GROUP, VERSION, self.namespace, plural, name
        )
        return result

    def find(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return self.get(plural, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, plural: str) -> list[dict[str, Any]]:
        result = self._call("list_namespaced_custom_object", GROUP, VERSION, self.namespace, plural)
        items: list[dict[str, Any]] = result.get("items") or []
        return sorted(items, key=lambda o: str(o["metadata"]["name"]))

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "create_namespaced_custom_object", GROUP, VERSION, self.namespace, plural, body
        )
        return result

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (lists are replaced whole)."""
        result: dict[str, Any] = self._call(
            "patch_namespaced_custom_object", GROUP, VERSION, self.namespace, plural, name, patch
        )
        return result

    def apply(self, plural: str, body: dict[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply: creates or updates, and drops the fields this manager set before but not now."""
        result: dict[str, Any] = self._call(
            "patch_namespaced_custom_object",
            GROUP,
            VERSION,
            self.namespace,
            plural,
            body["metadata"]["name"],
            body,
            field_manager=field_manager,
            force=True,
            _content_type=APPLY,
        )
        return result

    def scale(self, plural: str, name: str, replicas: int) -> dict[str, Any]:
        """The scale subresource, as `kubectl scale` writes it."""
        result: dict[str, Any] = self._call(
            "patch_namespaced_custom_object_scale",
            GROUP,
            VERSION,
            self.namespace,
            plural,
            name,
            {"spec": {"replicas": replicas}},
        )
        return result

    def delete(self, plural: str, name: str) -> None:
        self._call("delete_namespaced_custom_object", GROUP, VERSION, self.namespace, plural, name)

    def watch(self, plural: str, name: str, timeout: float) -> Iterator[dict[str, Any] | None]:
        """The object now, then each change (None: it does not exist), until `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        selector = f"metadata.name={name}"
        while True:
            listed = self._call(
                "list_namespaced_custom_object", GROUP, VERSION, self.namespace, plural, field_selector=selector
            )
            items = listed.get("items") or []
            yield items[0] if items else None
            version = listed["metadata"]["resourceVersion"]
            left = deadline - time.monotonic()
            if left <= 0:
                return
            stream: Any = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in stream.stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    plural,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=max(1, int(left)),
                ):
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    yield None if event["type"] == "DELETED" else event["object"]
                    if time.monotonic() >= deadline:
                        return
                else:
                    if time.monotonic() >= deadline:
                        return
            except client.ApiException as exc:
                if exc.status != 410:
                    raise _error(exc) from None
            except (OSError, urllib3.exceptions.HTTPError) as exc:
                raise KubeError(0, f"watching {plural}/{name}: {exc}") from None
            finally:
                stream.stop()


def _connect(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """An ApiClient and the context's namespace."""
    explicit = kubeconfig or os.environ.get("KUBECONFIG")
    default_file = Path(os.path.expanduser("~/.kube/config"))
    if explicit or context or default_file.exists():
        try:
            api = config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
            contexts, active = config.list_kube_config_contexts(kubeconfig)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as exc:
            raise KubeError(0, f"kubeconfig: {exc}") from None
        chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
        namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
        return api, str(namespace)
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        raise KubeError(0, "no kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config) and not in a pod") from None
    namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else "default"
    return client.ApiClient(configuration), namespace
