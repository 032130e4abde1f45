"""Waking a Deployment at zero: set its replicas to 1 through the scale subresource, and nothing else.

The router may only `get` and `patch` deployments/scale (the chart's ClusterRole): it never writes the CR
itself, so a GitOps tool and the router never fight over the user's spec. The operator sets spec.replicas on
its first reconcile, so the scale subresource always exists for a Deployment the operator has seen; before
that (kube-apiserver answers 500 "the spec replicas field ... does not exist"), the router retries briefly.
The PATCH carries the resourceVersion it read, so a concurrent scale by the autoscaler or a person is never
overwritten (409: read again); a deployment that already asks for replicas is left alone.
"""

from __future__ import annotations

import asyncio
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
    def __init__(self, client: KubeClient, attempts: int = 10, retry_delay: float = 0.5) -> None:
        self.client = client
        self.attempts = attempts
        self.retry_delay = retry_delay

    async def wake(self, namespace: str, name: str) -> None:
        path = scale_path(namespace, name)
        for _ in range(self.attempts):
            status, obj = await self.client.request("GET", path, time_limit=5.0)
            if status == 404:
                return
            if status == 500:  # spec.replicas not set yet: the operator sets it on its first reconcile
                await asyncio.sleep(self.retry_delay)
                continue
            if status != 200 or not isinstance(obj, dict):
                raise ApiError(status, str(obj)[:200])
            replicas = (obj.get("spec") or {}).get("replicas") or 0
            if replicas > 0:
                return
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            patch = {"metadata": {"resourceVersion": rv}, "spec": {"replicas": 1}}
            status, answer = await self.client.request(
                "PATCH", path, body=patch, content_type=MERGE_PATCH, time_limit=5.0
            )
            if status == 200:
                log.info("woke %s/%s: replicas %s -> 1", namespace, name, replicas)
                return
            if status != 409:
                raise ApiError(status, str(answer)[:200])
        log.warning("waking %s/%s: replicas unset or changing under us; giving up this time", namespace, name)
