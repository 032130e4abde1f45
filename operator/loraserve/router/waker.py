"""Waking a Deployment at zero: set its spec.replicas to 1 through the Kubernetes API.

When spec.replicas is 0 the router PATCHes the scale subresource. When the field is absent the scale
subresource cannot be used at all (kube-apiserver answers 500 "the spec replicas field \".spec.replicas\"
does not exist" to GET and PATCH), so the router merge-patches spec.replicas on the Deployment itself.
Either write carries the resourceVersion it read, so a concurrent scale by the autoscaler or a person is
never overwritten (409: read again); a deployment that already asks for replicas is left alone. RBAC:
get + patch on deployments and deployments/scale of serving.loraserve.dev.
"""

from __future__ import annotations

import logging

from loraserve.api.common import GROUP, VERSION
from loraserve.router.kubeapi import ApiError, KubeClient

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


def deployment_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/deployments/{name}"


def scale_path(namespace: str, name: str) -> str:
    return deployment_path(namespace, name) + "/scale"


class KubernetesWaker:
    def __init__(self, client: KubeClient, attempts: int = 3) -> None:
        self.client = client
        self.attempts = attempts

    async def wake(self, namespace: str, name: str) -> None:
        path = deployment_path(namespace, name)
        for _ in range(self.attempts):
            status, obj = await self.client.request("GET", path, time_limit=5.0)
            if status == 404:
                return
            if status != 200 or not isinstance(obj, dict):
                raise ApiError(status, str(obj)[:200])
            spec = obj.get("spec") or {}
            replicas = spec.get("replicas")
            if isinstance(replicas, int) and replicas > 0:
                return
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            patch = {"metadata": {"resourceVersion": rv}, "spec": {"replicas": 1}}
            target = scale_path(namespace, name) if replicas is not None else path
            status, answer = await self.client.request(
                "PATCH", target, body=patch, content_type=MERGE_PATCH, time_limit=5.0
            )
            if status == 200:
                log.info("woke %s/%s: spec.replicas %s -> 1", namespace, name, replicas)
                return
            if status != 409:
                raise ApiError(status, str(answer)[:200])
        log.warning("waking %s/%s: replicas kept changing under us; giving up this time", namespace, name)
