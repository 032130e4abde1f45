"""Model names clients send, and what they resolve to. Pure: no I/O.

Accepted forms of the body's `model`:

- `<model>#<deployment>`: `<model>` is the deployment's base model served name, one of its LoraAddons, or
  one exact adapter version (`<addon>-<version>`, pinned, bypassing the A/B split);
- `accounts/<ns>/models/<model>#accounts/<ns>/deployments/<deployment>` (either side may be qualified);
- `<deployment>` or `accounts/<ns>/deployments/<deployment>` alone for a live-merge deployment;
- `<addon>` or `accounts/<ns>/models/<addon>` alone for a serverless addon (one without `deployment`): it is
  routed to the serverless pool the operator seated it in (a live-merge deployment of that name wins);
- legacy: `model` names the model and the body key `deployedModel` names the deployment (`<deployment>` or
  `accounts/<ns>/deployments/<deployment>`); it routes, and the response says it is deprecated.

An unqualified deployment name is looked up in every namespace the router serves (and, when the API key is
scoped, those it may use); two matches are ambiguous and refused with the qualified form to use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from loraserve.router.errors import RouterError, bad_request, not_found
from loraserve.router.topology import AdapterVersion, DeploymentState

SEPARATOR = "#"


@dataclass(frozen=True, slots=True)
class NameRef:
    name: str
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed model reference: which model on which deployment (either may be absent)."""

    model: NameRef | None
    deployment: NameRef | None


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where a request goes: a deployment, and either its base (addon None) or an addon's versions."""

    deployment: DeploymentState
    addon: str | None  # addon name (the metrics label), None for the base / live-merge model
    versions: tuple[AdapterVersion, ...]  # candidate adapter versions; empty for the base model
    canonical: str  # `<model>#<deployment>` as the client should write it
    legacy: bool = False  # came through `deployedModel`

    @property
    def key(self) -> tuple[str, str]:
        return self.deployment.key


def _qualified(text: str, kind: str) -> NameRef | None:
    """`accounts/<ns>/<kind>/<name>` -> NameRef(name, ns); anything else with a slash -> None."""
    parts = text.split("/")
    if len(parts) == 4 and parts[0] == "accounts" and parts[2] == kind and parts[1] and parts[3]:
        return NameRef(parts[3], parts[1])
    return None


def parse_ref(text: str, kind: str) -> NameRef:
    if "/" in text:
        ref = _qualified(text, kind)
        if ref is None:
            raise bad_request(
                f"invalid {kind[:-1]} reference {text!r}: use a name or accounts/<namespace>/{kind}/<name>",
                param="model",
            )
        return ref
    if not text:
        raise bad_request(f"empty {kind[:-1]} name in model", param="model")
    return NameRef(text)


def parse_model(model: str, deployed_model: str | None = None) -> ModelRef:
    """Parse the body's `model` (and legacy `deployedModel`) into references. Raises RouterError (400)."""
    model = model.strip()
    if not model:
        raise bad_request("you must provide a model parameter", param="model")
    if SEPARATOR in model:
        left, _, right = model.partition(SEPARATOR)
        if SEPARATOR in right:
            raise bad_request(f"invalid model {model!r}: expected <model>#<deployment>", param="model")
        mref = parse_ref(left, "models")
        dref = parse_ref(right, "deployments")
        if deployed_model is not None:
            legacy = parse_ref(deployed_model.strip(), "deployments")
            if legacy.name != dref.name or (legacy.namespace and legacy.namespace != dref.namespace):
                raise bad_request(
                    "model and deployedModel name different deployments; use model=<model>#<deployment> only",
                    param="deployedModel",
                )
        return ModelRef(mref, dref)
    if deployed_model is not None:
        dref = parse_ref(deployed_model.strip(), "deployments")
        return ModelRef(parse_ref(model, "models"), dref)
    if "/" in model:
        qualified = _qualified(model, "deployments")
        if qualified is not None:
            return ModelRef(None, qualified)
        return ModelRef(parse_ref(model, "models"), None)
    # A bare name: a live-merge deployment by its own name (checked at resolution).
    return ModelRef(None, NameRef(model))


def _format(namespace: str | None, name: str, kind: str) -> str:
    return f"accounts/{namespace}/{kind}/{name}" if namespace else name


class Deployments(Protocol):
    def get(self, namespace: str, name: str) -> DeploymentState | None: ...
    def by_name(self, name: str) -> list[DeploymentState]: ...
    def all(self) -> list[DeploymentState]: ...


class VisibleDeployments:
    """The deployments as one API key sees them: those it may not use do not exist for it, so its answers
    (404, or the namespaces an ambiguous name lists) never tell it what exists elsewhere."""

    def __init__(self, store: Deployments, visible: Callable[[str, str], bool]) -> None:
        self.store = store
        self.visible = visible

    def get(self, namespace: str, name: str) -> DeploymentState | None:
        state = self.store.get(namespace, name)
        return state if state is not None and self.visible(namespace, name) else None

    def by_name(self, name: str) -> list[DeploymentState]:
        return [s for s in self.store.by_name(name) if self.visible(s.namespace, s.name)]

    def all(self) -> list[DeploymentState]:
        return [s for s in self.store.all() if self.visible(s.namespace, s.name)]


def resolve(
    ref: ModelRef,
    store: Deployments,
    *,
    legacy: bool = False,
    visible: Callable[[str, str], bool] | None = None,
) -> Resolution:
    """Find the deployment and the model on it. Raises RouterError (400 ambiguous / 404 unknown). With
    `visible` (an API key's scope), deployments outside it are treated as absent."""
    if visible is not None:
        store = VisibleDeployments(store, visible)
    dref = ref.deployment
    if dref is None:
        mname = _format(ref.model.namespace, ref.model.name, "models") if ref.model else ""
        if ref.model is not None:
            found = _serverless(ref.model.name, ref.model.namespace, store, legacy)
            if found is not None:
                return found
        raise not_found(
            f'The model {mname!r} names no deployment and no serverless addon: use model="<model>#<deployment>"',
            code="model_not_found",
        )
    if ref.model is not None and ref.model.namespace and dref.namespace and ref.model.namespace != dref.namespace:
        raise bad_request(
            f"model namespace {ref.model.namespace!r} differs from deployment namespace {dref.namespace!r}",
            param="model",
        )
    namespace = dref.namespace or (ref.model.namespace if ref.model else None)
    try:
        state = _find_deployment(dref.name, namespace, store)
    except RouterError as exc:
        if ref.model is None and dref.namespace is None and exc.status == 404:
            found = _serverless(dref.name, None, store, legacy)
            if found is not None:
                return found
            raise not_found(
                f'The model {dref.name!r} does not exist: use model="<model>#<deployment>" '
                "(a bare name is a live-merge deployment or a serverless addon)",
                code="model_not_found",
            ) from None
        raise
    dep_text = dref.name if dref.namespace is None else _format(state.namespace, state.name, "deployments")
    view = state.view

    if ref.model is None:
        if not view.live_merge:
            raise not_found(
                f"The model {dref.name!r} does not exist: deployment {dref.name!r} is not a live-merge deployment; "
                f'use model="{view.base_model}#{dref.name}" or model="<addon>#{dref.name}"',
                code="model_not_found",
            )
        return Resolution(state, None, (), f"{view.base_model}#{dep_text}", legacy)

    model = ref.model.name
    canonical = f"{_format(ref.model.namespace, model, 'models')}#{dep_text}"
    if model == view.base_model:
        return Resolution(state, None, (), canonical, legacy)
    versions = view.addons.get(model)
    if versions is not None:
        return Resolution(state, model, versions, canonical, legacy)
    for addon, addon_versions in view.addons.items():
        for version in addon_versions:
            if version.served_name == model:
                return Resolution(state, addon, (version,), canonical, legacy)
    raise not_found(
        f"The model {model!r} is not served by deployment {dep_text!r}",
        code="model_not_found",
    )


def _serverless(
    name: str,
    namespace: str | None,
    store: Deployments,
    legacy: bool,
) -> Resolution | None:
    """A serverless addon called by its own name: the pool that seats it, or None. Raises 400 when the
    unqualified name is seated in pools of several namespaces."""
    found = [
        s
        for s in store.all()
        if s.view.pool and name in s.view.addons and (namespace is None or s.namespace == namespace)
    ]
    if not found:
        return None
    if len(found) > 1:
        options = ", ".join(_format(s.namespace, name, "models") for s in found)
        raise RouterError(
            400, f"model {name!r} is ambiguous: qualify it as one of {options}", param="model", code="ambiguous_model"
        )
    state = found[0]
    canonical = _format(namespace, name, "models")
    return Resolution(state, name, state.view.addons[name], canonical, legacy)


def _find_deployment(
    name: str,
    namespace: str | None,
    store: Deployments,
) -> DeploymentState:
    if namespace is not None:
        state = store.get(namespace, name)
        if state is None:
            raise not_found(
                f"The deployment {_format(namespace, name, 'deployments')!r} does not exist",
                code="deployment_not_found",
            )
        return state
    candidates: Sequence[DeploymentState] = store.by_name(name)
    if not candidates:
        raise not_found(f"The deployment {name!r} does not exist", code="deployment_not_found")
    if len(candidates) > 1:
        options = ", ".join(_format(c.namespace, c.name, "deployments") for c in candidates)
        raise RouterError(
            400,
            f"deployment {name!r} is ambiguous: qualify it as one of {options}",
            param="model",
            code="ambiguous_deployment",
        )
    return candidates[0]


def model_ids(state: DeploymentState) -> list[tuple[str, str | None]]:
    """(`<model>#<deployment>` id, addon name or None) for everything a deployment serves, base first."""
    view = state.view
    out: list[tuple[str, str | None]] = []
    if view.live_merge:
        out.append((view.name, None))
    out.append((f"{view.base_model}#{view.name}", None))
    for addon in sorted(view.addons):
        out.append((f"{addon}#{view.name}", addon))
    return out
