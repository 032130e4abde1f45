"""What the CLI and the SDK send: command-line arguments turned into CR documents. Pure: no Kubernetes I/O.

Every builder returns a plain dict (`apiVersion`, `kind`, `metadata`, `spec`) that has been validated with the
pydantic models of `loraserve.api`, so a spec admission would refuse is refused here first, with the same
field path (`spec.maxReplicas: ...`). A `Refused` carries those lines; the CLI prints them and nothing else.

Only the fields a person set are written: defaults stay the server's, so a CR printed with `--dry-run -o yaml`
is what a person would write by hand and is accepted by `kubectl apply --dry-run=server`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loraserve.api import API_VERSION, Deployment, LoraAddon, ModelVersion
from loraserve.api.common import DNS1035_PATTERN, DNS1123_PATTERN
from loraserve.api.naming import base_model_name
from loraserve.durations import NON_NEGATIVE_DURATION_PATTERN, DurationError, parse_window

Doc = dict[str, Any]

# Longest metadata.name per kind (crd.py: Deployment names become Service and pod names).
MAX_NAME = {"Deployment": 40, "LoraAddon": 48, "ModelVersion": 48}
VERSION_SUFFIX = re.compile(r"-(v[1-9][0-9]*)$")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class Refused(ValueError):
    """A spec that admission would refuse: one `field.path: message` line per problem."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    model: type[Deployment] | type[LoraAddon] | type[ModelVersion]


DEPLOYMENT = Kind("Deployment", "deployments", Deployment)
LORA_ADDON = Kind("LoraAddon", "loraaddons", LoraAddon)
MODEL_VERSION = Kind("ModelVersion", "modelversions", ModelVersion)


# -- references --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """What a MODEL argument names: a base model URI, or a ModelVersion (optionally in a namespace)."""

    base_model: str | None = None
    model_version: str | None = None
    namespace: str | None = None


def _qualified(text: str, kind: str) -> tuple[str, str] | None:
    """`accounts/<ns>/<kind>/<name>` -> (ns, name)."""
    parts = text.split("/")
    if len(parts) == 4 and parts[0] == "accounts" and parts[2] == kind and parts[1] and parts[3]:
        return parts[1], parts[3]
    return None


def parse_model(text: str) -> ModelRef:
    """MODEL: a base model URI (`hf://org/name`, `s3://...`, `file:///...`), a ModelVersion name, or
    `accounts/<ns>/models/<name>` (a ModelVersion in that namespace)."""
    text = text.strip()
    if "://" in text:
        return ModelRef(base_model=text)
    qualified = _qualified(text, "models")
    if qualified is not None:
        return ModelRef(model_version=qualified[1], namespace=qualified[0])
    if re.fullmatch(DNS1123_PATTERN, text) and len(text) <= 253:
        return ModelRef(model_version=text)
    raise Refused(
        [
            f"MODEL: {text!r} is neither a model URI (hf://org/name, s3://bucket/prefix, gs://..., pvc://claim/path, "
            "https://..., file:///path) nor a ModelVersion name (or accounts/<namespace>/models/<name>)"
        ]
    )


def parse_deployment_ref(text: str) -> tuple[str | None, str]:
    """A deployment ID: `<name>` or `accounts/<ns>/deployments/<name>` -> (namespace or None, name)."""
    qualified = _qualified(text.strip(), "deployments")
    if qualified is not None:
        return qualified
    return None, text.strip()


def one_namespace(*candidates: str | None) -> str | None:
    """The namespace named by -n and by qualified references; they must agree."""
    named = {c for c in candidates if c}
    if len(named) > 1:
        raise Refused([f"namespace: the arguments name different namespaces: {', '.join(sorted(named))}"])
    return named.pop() if named else None


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-")
    if not slug or not slug[0].isalpha():
        slug = ("m-" + slug)[:limit].rstrip("-")
    return slug


def default_deployment_id(model: ModelRef) -> str:
    """The Deployment name when `--id` is not given: the model's name as a DNS-1035 label,
    e.g. hf://meta-llama/Llama-3.1-8B-Instruct -> llama-3-1-8b-instruct."""
    name = base_model_name(model.base_model) if model.base_model else str(model.model_version)
    return _slug(name, MAX_NAME["Deployment"])


def default_addon_name(model_version: str) -> str:
    """The LoraAddon `load-lora` makes for a ModelVersion: its name without the version suffix
    (support-bot-v2 -> support-bot), so the next version of the same fine-tune lands on the same addon."""
    stem = VERSION_SUFFIX.sub("", model_version)
    return stem[: MAX_NAME["LoraAddon"]].rstrip("-")


def version_from_name(name: str) -> str | None:
    """`support-bot-v3` -> `v3` (the ModelVersion's spec.version when `--version` is not given)."""
    match = VERSION_SUFFIX.search(name)
    return match.group(1) if match else None


# -- validation --------------------------------------------------------------------------------------------
_FIELD_PREFIX = re.compile(r"^([a-zA-Z][a-zA-Z0-9]*): (.*)$", re.DOTALL)


def refusal_lines(exc: ValidationError) -> list[str]:
    """pydantic's errors as `spec.field: message`, the shape of an admission refusal."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch":
            shown = json.dumps(error["input"], ensure_ascii=False)
            if (error.get("ctx") or {}).get("pattern") == NON_NEGATIVE_DURATION_PATTERN:
                message = f"{shown} is not a Go duration (units ns, us, ms, s, m, h: e.g. 30s, 10m, 1h30m)"
            else:
                message = f"{shown}: {message}"
        # Cross-field rules say which field they are about as "field: message".
        match = _FIELD_PREFIX.match(message)
        if match and error["type"] == "value_error":
            path = f"{path}.{match.group(1)}" if path else match.group(1)
            message = match.group(2)
        lines.append(f"{path}: {message}" if path else message)
    return lines


def _check_name(kind: Kind, name: str) -> None:
    pattern = DNS1035_PATTERN if kind is DEPLOYMENT else DNS1123_PATTERN
    limit = MAX_NAME[kind.kind]
    if len(name) > limit or not re.fullmatch(pattern, name):
        what = "a DNS-1035 label (lower case letters, digits and '-', starting with a letter)"
        if kind is not DEPLOYMENT:
            what = "lower case letters, digits and '-', starting and ending with a letter or digit"
        raise Refused([f"metadata.name: {name!r} must be {what}, at most {limit} characters"])


def document(kind: Kind, name: str, namespace: str | None, spec: Mapping[str, Any]) -> Doc:
    """A CR document of `kind`, validated with its pydantic model. Raises Refused."""
    _check_name(kind, name)
    metadata: Doc = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    doc: Doc = {"apiVersion": API_VERSION, "kind": kind.kind, "metadata": metadata, "spec": dict(spec)}
    validate(kind, doc)
    return doc


def validate(kind: Kind, doc: Mapping[str, Any]) -> None:
    """Raises Refused with the problems admission would find in `doc`'s spec."""
    body = {k: v for k, v in doc.items() if k in ("apiVersion", "kind", "metadata", "spec")}
    try:
        kind.model.model_validate(body)
    except ValidationError as exc:
        raise Refused(refusal_lines(exc)) from None


def _set(spec: Doc, key: str, value: Any) -> None:
    if value is not None and value != []:
        spec[key] = value


def parse_toleration(text: str) -> Doc:
    """kubectl's taint syntax: `key=value:Effect`, `key:Effect` (any value), `key=value` or `key` (any effect)."""
    body, _, effect = text.partition(":")
    key, eq, value = body.partition("=")
    if not key or (effect and effect not in TOLERATION_EFFECTS):
        effects = ", ".join(TOLERATION_EFFECTS)
        raise Refused([f"spec.tolerations: {text!r}: expected key[=value][:effect], effect one of {effects}"])
    toleration: Doc = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


@dataclass(frozen=True)
class DeploymentOptions:
    """The spec fields of `create/update deployment` (None: not given, the server's default or unchanged)."""

    enable_addons: bool | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    scale_up_window: str | None = None
    scale_down_window: str | None = None
    scale_to_zero_window: str | None = None
    accelerator_type: str | None = None
    accelerator_count: int | None = None
    long_prompt: bool | None = None
    region: str | None = None
    max_loras: int | None = None
    max_lora_rank: int | None = None
    credentials_secret: str | None = None
    extra_args: tuple[str, ...] = ()
    tolerations: tuple[str, ...] = ()

    def spec(self) -> Doc:
        """The camelCase spec fields set here."""
        spec: Doc = {}
        _set(spec, "enableAddons", self.enable_addons)
        _set(spec, "minReplicas", self.min_replicas)
        _set(spec, "maxReplicas", self.max_replicas)
        _set(spec, "scaleUpWindow", self.scale_up_window)
        _set(spec, "scaleDownWindow", self.scale_down_window)
        _set(spec, "scaleToZeroWindow", self.scale_to_zero_window)
        _set(spec, "acceleratorType", self.accelerator_type)
        _set(spec, "acceleratorCount", self.accelerator_count)
        _set(spec, "longPrompt", self.long_prompt)
        _set(spec, "region", self.region)
        _set(spec, "maxLoras", self.max_loras)
        _set(spec, "maxLoraRank", self.max_lora_rank)
        _set(spec, "credentialsSecret", self.credentials_secret)
        _set(spec, "extraArgs", list(self.extra_args))
        _set(spec, "tolerations", [parse_toleration(t) for t in self.tolerations])
        return spec


def deployment_manifest(name: str, namespace: str | None, model: ModelRef, options: DeploymentOptions) -> Doc:
    """`create deployment MODEL`: a base model (multi-LoRA with enable_addons) or a ModelVersion (live merge)."""
    spec: Doc = {}
    if model.base_model is not None:
        spec["baseModel"] = model.base_model
    else:
        spec["modelVersion"] = model.model_version
    spec.update(options.spec())
    return document(DEPLOYMENT, name, namespace, spec)


def deployment_patch(live: Mapping[str, Any], options: DeploymentOptions) -> Doc:
    """`update deployment ID`: a merge patch of the fields given, checked against the live object merged with
    it (admission checks the result, not the patch). Raises Refused; an empty patch is refused too."""
    changes = options.spec()
    if not changes:
        raise Refused(["nothing to update: give at least one field flag (see --help)"])
    merged_spec = {**(live.get("spec") or {}), **changes}
    validate(DEPLOYMENT, {"apiVersion": API_VERSION, "kind": "Deployment", "spec": merged_spec})
    return {"spec": changes}


def model_version_manifest(
    name: str,
    namespace: str | None,
    *,
    version: str | None,
    base_model: str,
    base_revision: str | None,
    adapter_uri: str,
    digest: str | None,
    rank: int | None,
    system_prompt: str | None = None,
) -> Doc:
    """`create model-version NAME --base URI --adapter DIR|URI`."""
    version = version or version_from_name(name)
    if version is None:
        raise Refused([f"spec.version: {name!r} does not end in -v<N>: give --version v<N>"])
    if base_revision is None:
        if not base_model.startswith("file://"):
            raise Refused(["spec.baseModel.revision: give --base-revision (the commit or digest trained on)"])
        base_revision = "local"  # a directory on the node: there is no upstream revision to pin
    adapter: Doc = {"uri": adapter_uri}
    _set(adapter, "digest", digest)
    _set(adapter, "rank", rank)
    spec: Doc = {"version": version, "baseModel": {"name": base_model, "revision": base_revision}, "adapter": adapter}
    _set(spec, "systemPrompt", system_prompt)
    return document(MODEL_VERSION, name, namespace, spec)


def addon_manifest(name: str, namespace: str | None, model_version: str, deployment: str | None) -> Doc:
    """`load-lora MODEL [--deployment ID]`: one ModelVersion at 100 %; no deployment = the serverless pool."""
    spec: Doc = {}
    _set(spec, "deployment", deployment)
    spec["targets"] = [{"modelVersion": model_version, "weight": 100}]
    return document(LORA_ADDON, name, namespace, spec)


def check_duration(text: str, what: str) -> float:
    """A Go duration in seconds (e.g. `--timeout 10m`). Raises Refused."""
    try:
        return parse_window(text)
    except DurationError as exc:
        raise Refused([f"{what}: {exc}"]) from None


# -- traffic -----------------------------------------------------------------------------------------------
def parse_traffic(pairs: Iterable[str]) -> list[tuple[str, int]]:
    """`v3=90 v2=10` -> [("v3", 90), ("v2", 10)]; keys are versions (v3) or ModelVersion names."""
    out: list[tuple[str, int]] = []
    for pair in pairs:
        key, eq, weight = pair.partition("=")
        if not eq or not key or not weight.strip().isdigit():
            raise Refused([f"spec.targets: {pair!r}: expected VERSION=WEIGHT, e.g. v3=90"])
        out.append((key.strip(), int(weight)))
    if not out:
        raise Refused(["spec.targets: give at least one VERSION=WEIGHT"])
    return out


def _family(name: str) -> str:
    return VERSION_SUFFIX.sub("", name)


def resolve_version(key: str, addon: str, current: Sequence[str], versions: Mapping[str, Mapping[str, Any]]) -> str:
    """The ModelVersion `key` means for the addon: a ModelVersion's own name, or a version label (`v3`) among
    the namespace's ModelVersions (`versions`: name -> spec), narrowed to the addon's family (the names of its
    current targets and of the addon, less the `-v<N>` suffix) and then to the base model of its targets."""
    if key in versions:
        return key
    candidates = sorted(n for n, spec in versions.items() if spec.get("version") == key)
    if len(candidates) > 1:
        families = {_family(n) for n in current} | {addon}
        narrowed = [c for c in candidates if _family(c) in families]
        if not narrowed:
            bases = {(versions[n].get("baseModel") or {}).get("name") for n in current if n in versions}
            narrowed = [c for c in candidates if (versions[c].get("baseModel") or {}).get("name") in bases]
        candidates = narrowed or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise Refused([f"spec.targets: no ModelVersion is named {key!r} or has version {key!r}"])
    raise Refused([f"spec.targets: {key!r} is ambiguous ({', '.join(candidates)}): name the ModelVersion"])


def traffic_patch(
    addon: Mapping[str, Any], pairs: Sequence[tuple[str, int]], versions: Mapping[str, Mapping[str, Any]]
) -> Doc:
    """`set-traffic ADDON v3=90 v2=10`: a merge patch replacing the addon's targets (weights sum to 100)."""
    name = str((addon.get("metadata") or {}).get("name", ""))
    spec = dict(addon.get("spec") or {})
    current = [str(t.get("modelVersion")) for t in spec.get("targets") or []]
    targets = [{"modelVersion": resolve_version(k, name, current, versions), "weight": w} for k, w in pairs]
    validate(LORA_ADDON, {"apiVersion": API_VERSION, "kind": "LoraAddon", "spec": {**spec, "targets": targets}})
    return {"spec": {"targets": targets}}


def rollback_patch(addon: Mapping[str, Any], to: str, versions: Mapping[str, Mapping[str, Any]]) -> Doc:
    """`rollback ADDON --to VERSION`: all traffic to VERSION (a pointer flip; the others stay warm a while)."""
    return traffic_patch(addon, [(to, 100)], versions)


# -- admission refusals ------------------------------------------------------------------------------------
_INVALID_VALUE = re.compile(r'^Invalid value: (?:(?:"(?:[^"\\]|\\.)*"|[^\s:]+): )?')


def admission_lines(status: Mapping[str, Any]) -> list[str]:
    """An apiserver refusal (a `Status` with code 422) as `field: message` lines: the field path and the rule's
    message, without the value dump and the object's name the apiserver puts around them."""
    causes = (status.get("details") or {}).get("causes") or []
    lines = []
    for cause in causes:
        message = _INVALID_VALUE.sub("", str(cause.get("message", "")))
        field = cause.get("field")
        lines.append(f"{field}: {message}" if field else message)
    if not lines:
        message = str(status.get("message") or "the request was refused")
        # `Kind.group "name" is invalid: spec.x: ...`
        lines.append(message.split(" is invalid: ", 1)[-1])
    return lines
