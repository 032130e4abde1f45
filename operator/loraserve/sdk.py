"""A small Python SDK in the shape of the Fireworks Build SDK: an `LLM` is a model you can deploy and call.

    from loraserve.sdk import LLM

    base = LLM("hf://meta-llama/Llama-3.1-8B-Instruct", "on-demand", id="llama", enable_addons=True).apply()
    bot = LLM("support-bot-v2", "on-demand-lora", base_id="llama", router_url="http://loraserve-router").apply()
    bot.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])
    bot.delete()

`deployment_type`:

- `"on-demand"`: a Deployment named `id` for `model`, a base model URI (multi-LoRA with `enable_addons`) or a
  ModelVersion (live merge); replicas, windows and accelerator options go into its spec;
- `"on-demand-lora"`: `model` is a ModelVersion, loaded as a LoraAddon named `id` (default: the ModelVersion's
  name without `-v<N>`) on the Deployment `base_id`, which must have `enable_addons`;
- `"serverless"`: the same LoraAddon without a Deployment: the operator seats it on the shared serverless pool
  of the ModelVersion's base model.

`.apply()` is idempotent: server-side apply as field manager `loraserve-sdk` (creates, or changes what this
LLM sets, and drops what it set before but not now; `spec.replicas` stays the autoscaler's), then waits until
the object is Ready for its generation (kstatus, as `loraserve ... --wait`), raising `DeploymentFailed` when it
is Stalled (GPUStockout, BaseModelMismatch, ...) and `TimeoutError` after `timeout` seconds. `.delete()` deletes
it, `.state` reads its state. The CRs are built and checked by `loraserve.cli.manifests`, like the CLI's.

`.chat.completions.create(...)` and `.completions.create(...)` are the official `openai` client's, pointed at the
router (`router_url`, else $LORASERVE_ROUTER_URL) with `model` filled in as `<model>#<deployment>` (README
"Calling models"), the deployment qualified with its namespace (`accounts/<ns>/deployments/<name>`) so that a
name used in several namespaces is never ambiguous.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

import openai

from loraserve.api.naming import base_model_name
from loraserve.cli import manifests as m
from loraserve.cli import views
from loraserve.cli.kubeclient import KubeClient, KubeError

__all__ = ["LLM", "DeploymentFailed", "DeploymentType", "KubeError"]

DeploymentType = Literal["on-demand", "on-demand-lora", "serverless"]
FIELD_MANAGER = "loraserve-sdk"
log = logging.getLogger(__name__)


class DeploymentFailed(RuntimeError):
    """The object is Stalled for its current generation (state FAILED): the reason and message say why."""

    def __init__(self, observation: views.Observation) -> None:
        super().__init__(observation.line())
        self.reason = observation.reason
        self.message = observation.message


class _Completions:
    def __init__(self, llm: LLM, chat: bool) -> None:
        self._llm = llm
        self._chat = chat

    def create(self, **kwargs: Any) -> Any:
        """openai's `create`, with `model` filled in (see `LLM.router_model`)."""
        kwargs.setdefault("model", self._llm.router_model)
        api: Any = self._llm.client.chat.completions if self._chat else self._llm.client.completions
        return api.create(**kwargs)


class _Chat:
    def __init__(self, llm: LLM) -> None:
        self.completions = _Completions(llm, chat=True)


class LLM:
    """A model on loraserve: its CR (a Deployment or a LoraAddon) and an OpenAI client that calls it."""

    def __init__(
        self,
        model: str,
        deployment_type: DeploymentType = "on-demand",
        *,
        id: str | None = None,
        base_id: str | None = None,
        enable_addons: bool | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        scale_up_window: str | None = None,
        scale_down_window: str | None = None,
        scale_to_zero_window: str | None = None,
        accelerator_type: str | None = None,
        accelerator_count: int | None = None,
        long_prompt: bool | None = None,
        region: str | None = None,
        tolerations: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        router_url: str | None = None,
        api_key: str | None = None,
        namespace: str | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        timeout: float = 900.0,
    ) -> None:
        if deployment_type not in ("on-demand", "on-demand-lora", "serverless"):
            raise ValueError(f"deployment_type: {deployment_type!r}: on-demand, on-demand-lora or serverless")
        self.model = model
        self.deployment_type: DeploymentType = deployment_type
        self.router_url = router_url or os.environ.get("LORASERVE_ROUTER_URL")
        self.api_key = api_key or os.environ.get("LORASERVE_API_KEY") or "none"
        self.kubeconfig = os.fspath(kubeconfig) if kubeconfig is not None else None
        self.context = context
        self.timeout = timeout
        ref = m.parse_model(model)
        options = m.DeploymentOptions(
            enable_addons=enable_addons,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            scale_up_window=scale_up_window,
            scale_down_window=scale_down_window,
            scale_to_zero_window=scale_to_zero_window,
            accelerator_type=accelerator_type,
            accelerator_count=accelerator_count,
            long_prompt=long_prompt,
            region=region,
            extra_args=tuple(extra_args),
            tolerations=tuple(tolerations),
        )
        base_namespace, base = m.parse_deployment_ref(base_id) if base_id else (None, None)
        self.namespace = m.one_namespace(namespace, ref.namespace, base_namespace)
        if deployment_type == "on-demand":
            if base_id is not None:
                raise ValueError("base_id: only for deployment_type='on-demand-lora'")
            self.kind = m.DEPLOYMENT
            self.id = id or m.default_deployment_id(ref)
            self.manifest = m.deployment_manifest(self.id, self.namespace, ref, options)
            self.deployment: str | None = self.id
            return
        if ref.model_version is None:
            raise ValueError(f"model: {deployment_type} serves a fine-tune: name its ModelVersion, not {model!r}")
        if options.spec():
            raise ValueError(f"replica and accelerator options belong to the Deployment, not to a {deployment_type}")
        if deployment_type == "on-demand-lora" and base is None:
            raise ValueError("base_id: on-demand-lora needs the Deployment (with enable_addons) to load onto")
        if deployment_type == "serverless" and base is not None:
            raise ValueError("base_id: a serverless addon has no Deployment of its own")
        self.kind = m.LORA_ADDON
        self.id = id or m.default_addon_name(ref.model_version)
        self.manifest = m.addon_manifest(self.id, self.namespace, ref.model_version, base)
        self.deployment = base  # serverless: known once the operator seats it (status.deployment)

    def __repr__(self) -> str:
        return f"LLM({self.model!r}, {self.deployment_type!r}, id={self.id!r})"

    # -- Kubernetes ----------------------------------------------------------------------------------------
    @cached_property
    def kube(self) -> KubeClient:
        return KubeClient(self.kubeconfig, self.context, self.namespace)

    def get(self) -> dict[str, Any] | None:
        """The live object, or None."""
        return self.kube.find(self.kind.plural, self.id)

    @property
    def state(self) -> str | None:
        """status.state now (e.g. READY, SCALED_TO_ZERO, FAILED for a Deployment; READY, PENDING for an addon);
        None when it does not exist or has no status yet."""
        obj = self.get()
        return None if obj is None else (obj.get("status") or {}).get("state")

    def apply(self, wait: bool = True, timeout: float | None = None) -> LLM:
        """Create or update the object (idempotent), then wait until it is Ready. Returns self."""
        doc = {**self.manifest, "metadata": {**self.manifest["metadata"], "namespace": self.kube.namespace}}
        try:
            self.kube.apply(self.kind.plural, doc, FIELD_MANAGER)
        except KubeError as exc:
            if exc.status == 422:
                raise m.Refused(m.admission_lines(exc.body)) from None
            raise
        if wait:
            self.wait(timeout)
        return self

    def wait(self, timeout: float | None = None, until_gone: bool = False) -> None:
        """Wait until Ready for the current generation (or deleted). Raises DeploymentFailed, TimeoutError."""
        seconds = self.timeout if timeout is None else timeout
        stream = self.kube.watch(self.kind.plural, self.id, seconds)
        outcome, last = views.follow(self.id, stream, lambda seen: log.info("%s", seen.line()), until_gone=until_gone)
        if outcome is views.Outcome.FAILED and last is not None:
            raise DeploymentFailed(last)
        if outcome is views.Outcome.TIMEOUT:
            raise TimeoutError(f"not {'gone' if until_gone else 'ready'} after {seconds:.0f}s: {last and last.line()}")

    def delete(self, wait: bool = False, timeout: float | None = None) -> None:
        """Delete the object (nothing if it is gone already); with `wait`, until the operator has cleaned up."""
        try:
            self.kube.delete(self.kind.plural, self.id)
        except KubeError as exc:
            if exc.status != 404:
                raise
        if wait:
            self.wait(timeout, until_gone=True)

    # -- calling it ----------------------------------------------------------------------------------------
    @property
    def router_model(self) -> str:
        """The `model` the router resolves to this LLM: `<model>#accounts/<ns>/deployments/<deployment>` (a
        live-merge Deployment: `accounts/<ns>/deployments/<name>` alone)."""
        namespace = self.namespace or self.kube.namespace
        deployment = self.deployment
        if deployment is None:  # serverless: the pool the operator chose
            obj = self.get()
            deployment = ((obj or {}).get("status") or {}).get("deployment")
            if not deployment:
                raise RuntimeError(f"addon {self.id} has no serverless pool yet: apply() it first")
        qualified = f"accounts/{namespace}/deployments/{deployment}"
        spec = self.manifest["spec"]
        if self.kind is m.LORA_ADDON:
            return f"{self.id}#{qualified}"
        if spec.get("baseModel"):
            return f"{base_model_name(spec['baseModel'])}#{qualified}"
        return qualified

    @cached_property
    def client(self) -> openai.OpenAI:
        """The official OpenAI client, pointed at the router."""
        if not self.router_url:
            raise RuntimeError("router_url: pass LLM(..., router_url=...) or set LORASERVE_ROUTER_URL")
        base = self.router_url.rstrip("/")
        return openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key=self.api_key)

    @property
    def chat(self) -> _Chat:
        return _Chat(self)

    @property
    def completions(self) -> _Completions:
        return _Completions(self, chat=False)
