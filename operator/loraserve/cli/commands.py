"""The firectl-like verbs of `loraserve` (click for parsing, rich for tables and live progress).

    loraserve create deployment MODEL [--id ID] [--enable-addons] [--min-replica-count N] ... [--wait]
    loraserve get | list | update | delete deployment [ID]      loraserve scale deployment ID --replicas N
    loraserve load-lora MODEL [--deployment ID]                 loraserve unload-lora ADDON
    loraserve create model-version NAME --base URI --adapter DIR|URI     get | list model-version
    loraserve set-traffic ADDON v3=90 v2=10                     loraserve rollback ADDON --to v2

Arguments become CRs in `manifests` (pure, validated with the API models), the API is reached through
`kubeclient`, and what `--wait` follows is decided in `views`. Exit codes: see `ExitCode`.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from loraserve.api import AcceleratorType
from loraserve.api.naming import addon_deployment
from loraserve.cli import manifests as m
from loraserve.cli import views
from loraserve.cli.kubeclient import KubeClient, KubeError
from loraserve.digest import directory_digest
from loraserve.durations import DurationError, parse_window

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(enum.IntEnum):
    """What `loraserve` exits with (documented in the README)."""

    OK = 0
    ERROR = 1  # the API could not be reached, permission denied, anything else
    USAGE = 2  # unknown command or flag, missing argument
    REFUSED = 3  # the spec is invalid: refused before sending, or by admission (HTTP 422)
    NOT_FOUND = 4
    CONFLICT = 5  # already exists
    FAILED = 6  # --wait: the object is Stalled (state FAILED, e.g. GPUStockout)
    TIMEOUT = 7  # --wait: not ready in --timeout
    INTERRUPTED = 130


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 error (API unreachable, forbidden); 2 usage; 3 refused (invalid spec, admission); "
    "4 not found; 5 already exists; 6 --wait saw FAILED (Stalled); 7 --wait timed out; 130 interrupted."
)


class CliError(Exception):
    """An error shown as its lines alone (stderr) with its exit code."""

    def __init__(self, lines: Iterable[str], code: ExitCode, prefix: str = "error: ") -> None:
        self.lines = [prefix + line for line in lines]
        super().__init__("\n".join(self.lines))
        self.exit_code = int(code)

    def show(self) -> None:
        for line in self.lines:
            stderr().print(line, markup=False, highlight=False)


def refused(exc: m.Refused) -> CliError:
    return CliError(exc.lines, ExitCode.REFUSED, prefix="")


def api_error(exc: KubeError) -> CliError:
    """An API failure as a person reads it: an admission refusal as its field and message only."""
    if exc.status == 422:
        return CliError(m.admission_lines(exc.body), ExitCode.REFUSED, prefix="")
    if exc.status == 404:
        message = str(exc)
        if "could not find the requested resource" in message:
            message += " (are the loraserve CRDs installed in this cluster?)"
        return CliError([message], ExitCode.NOT_FOUND)
    if exc.status == 409:
        return CliError([str(exc)], ExitCode.CONFLICT)
    return CliError([str(exc) if exc.status in (0, 403) else f"HTTP {exc.status}: {exc}"], ExitCode.ERROR)


def stdout() -> Console:
    return Console(soft_wrap=True, highlight=False)


def stderr() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def echo_doc(doc: Any, output: str) -> None:
    text = json.dumps(doc, indent=2) + "\n" if output == "json" else yaml.safe_dump(doc, sort_keys=False)
    click.echo(text, nl=False)


# -- connection options, accepted before or after the verb (like kubectl) ----------------------------------
@dataclass
class Settings:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    clients: dict[str | None, KubeClient] = field(default_factory=dict)

    def kube(self, namespace: str | None = None) -> KubeClient:
        """A client for `namespace` (a qualified reference), else -n, else the context's namespace."""
        key = namespace or self.namespace
        if key not in self.clients:
            try:
                self.clients[key] = KubeClient(self.kubeconfig, self.context, key)
            except KubeError as exc:
                raise api_error(exc) from None
        return self.clients[key]


def _store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and param.name:
        setattr(ctx.ensure_object(Settings), param.name, value)


def kube_options(f: F) -> F:
    f = click.option(
        "--kubeconfig",
        expose_value=False,
        callback=_store,
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)",
    )(f)
    f = click.option("--context", expose_value=False, callback=_store, help="kubeconfig context")(f)
    f = click.option(
        "-n", "--namespace", expose_value=False, callback=_store, help="namespace (default: the context's)"
    )(f)
    return f


def output_option(f: F) -> F:
    return click.option(
        "-o", "--output", type=click.Choice(["yaml", "json"]), default=None, help="print the object as yaml or json"
    )(f)


def _go_duration(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A Go duration (`90s`, `15m`, `1h30m`), checked when the command line is read."""
    try:
        parse_window(value)
    except DurationError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


def wait_options(f: F) -> F:
    f = click.option("--wait", is_flag=True, help="follow progress until ready (exit 0), failed (6) or timeout (7)")(f)
    f = click.option(
        "--timeout", default="15m", callback=_go_duration, show_default=True, help="how long --wait waits"
    )(f)
    return f


@contextmanager
def reporting() -> Iterator[None]:
    try:
        yield
    except m.Refused as exc:
        raise refused(exc) from None
    except KubeError as exc:
        raise api_error(exc) from None


class AliasGroup(click.Group):
    """A group whose commands also answer to other names (deployments, lsd; mv; lora, addons, ...)."""

    def __init__(self, *args: Any, aliases: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = aliases or {}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))


KIND_ALIASES = {
    "deployments": "deployment",
    "lsd": "deployment",
    "lsdeploy": "deployment",
    "model-versions": "model-version",
    "modelversion": "model-version",
    "modelversions": "model-version",
    "mv": "model-version",
    "addons": "addon",
    "lora": "addon",
    "loras": "addon",
    "loraaddon": "addon",
    "loraaddons": "addon",
    "lora-addon": "addon",
    "lora-addons": "addon",
}
KINDS = {"deployment": m.DEPLOYMENT, "model-version": m.MODEL_VERSION, "addon": m.LORA_ADDON}


@click.group(
    cls=AliasGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    epilog=EXIT_CODES_HELP,
)
@kube_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """loraserve: fine-tuned LLMs on Kubernetes. Deployments, LoRA addons and model versions, firectl-style."""
    ctx.ensure_object(Settings)


def _group(name: str, help_text: str) -> AliasGroup:
    group = AliasGroup(name=name, help=help_text, aliases=KIND_ALIASES, epilog=EXIT_CODES_HELP)
    cli.add_command(group)
    return group


create = _group("create", "Create a deployment or a model version.")
get = _group("get", "Show one deployment, model version or addon.")
list_ = _group("list", "List deployments, model versions or addons.")
update = _group("update", "Change a deployment's spec.")
delete = _group("delete", "Delete a deployment, model version or addon.")
scale = _group("scale", "Set a deployment's replicas (the scale subresource, like kubectl scale).")


# -- waiting -----------------------------------------------------------------------------------------------
def follow(kube: KubeClient, kind: m.Kind, name: str, timeout: str, until_gone: bool = False) -> ExitCode:
    """`--wait`: live progress (state, replicas ready/desired, the Stalled reason) until an outcome."""
    seconds = m.check_duration(timeout, "--timeout")
    err = stderr()
    started = time.monotonic()
    try:
        if err.is_terminal:
            columns = (
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}"),
            )
            with Progress(*columns, console=err) as progress:
                task = progress.add_task(name, total=None, detail="")

                def show(seen: views.Observation) -> None:
                    # The whole reason is printed when the wait ends; the live row keeps its columns.
                    detail = seen.line().split(" · ", 2)[-1] if seen.failed else ""
                    detail = detail if len(detail) <= 60 else detail[:59] + "…"
                    progress.update(
                        task,
                        description=f"{name}: {seen.state or 'PENDING'}" if seen.exists else f"{name}: gone",
                        completed=seen.ready or 0,
                        total=seen.desired if seen.desired else None,
                        detail=detail,
                    )

                outcome, last = views.follow(name, kube.watch(kind.plural, name, seconds), show, until_gone=until_gone)
        else:
            printed: list[str] = []

            def show(seen: views.Observation) -> None:
                line = seen.line()
                if not printed or printed[-1] != line:  # a log: one line per visible change
                    printed.append(line)
                    err.print(f"[{time.monotonic() - started:5.0f}s] {line}", markup=False)

            outcome, last = views.follow(name, kube.watch(kind.plural, name, seconds), show, until_gone=until_gone)
    except KeyboardInterrupt:
        err.print(f"interrupted: {kind.kind} {name} goes on without us", markup=False)
        return ExitCode.INTERRUPTED
    except KubeError as exc:
        raise api_error(exc) from None
    summary = last.line() if last else name
    if outcome is views.Outcome.DONE:
        err.print(f"✓ {summary}", markup=False)
        return ExitCode.OK
    if outcome is views.Outcome.FAILED:
        err.print(f"✗ {summary}", markup=False)
        return ExitCode.FAILED
    err.print(f"✗ timed out after {timeout}: {summary}", markup=False)
    return ExitCode.TIMEOUT


# -- deployments -------------------------------------------------------------------------------------------
def deployment_options(f: F) -> F:
    options = [
        click.option(
            "--enable-addons/--no-enable-addons", default=None, help="multi-LoRA: LoraAddons load at run time"
        ),
        click.option("--min-replica-count", "min_replicas", type=int, help="replicas kept however idle (default 0)"),
        click.option("--max-replica-count", "max_replicas", type=int, help="autoscaler's upper bound"),
        click.option("--scale-up-window", help="Go duration (default 30s)"),
        click.option("--scale-down-window", help="Go duration (default 10m)"),
        click.option("--scale-to-zero-window", help="Go duration, at least 5m (default 1h)"),
        click.option(
            "--accelerator-type",
            type=click.Choice([a.value for a in AcceleratorType]),
            help="GPU type (default NVIDIA_A100_80GB)",
        ),
        click.option("--accelerator-count", type=int, help="GPUs per replica = tensor-parallel size: 1, 2, 4 or 8"),
        click.option("--long-prompt/--no-long-prompt", default=None, help="long context: doubles an unset GPU count"),
        click.option("--region", help="node region (fixed at creation)"),
        click.option("--max-loras", type=int, help="adapters in GPU memory at once (with --enable-addons)"),
        click.option("--max-lora-rank", type=int, help="largest adapter rank: 8 ... 512"),
        click.option("--credentials-secret", help="Secret with HF_TOKEN or S3 credentials for the weights"),
        click.option("--extra-arg", "extra_args", multiple=True, help="more vLLM flags (repeat)"),
        click.option("--toleration", "tolerations", multiple=True, help="key[=value][:Effect] (repeat)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(fields: dict[str, Any]) -> m.DeploymentOptions:
    fields["extra_args"] = tuple(fields.get("extra_args") or ())
    fields["tolerations"] = tuple(fields.get("tolerations") or ())
    return m.DeploymentOptions(**fields)


def _deployment_done(obj: dict[str, Any], verb: str, namespace: str) -> None:
    name = obj["metadata"]["name"]
    stdout().print(f"{verb} Deployment {name} in {namespace}: call it as model={views.deployment_model(obj)!r}")


@create.command("deployment", epilog=EXIT_CODES_HELP)
@click.argument("model")
@click.option("--id", "id_", metavar="ID", help="the Deployment's name (default: from the model's name)")
@deployment_options
@wait_options
@output_option
@click.option("--dry-run", is_flag=True, help="print the CR (yaml unless -o json) instead of creating it")
@kube_options
@click.pass_obj
def create_deployment(
    settings: Settings,
    /,
    model: str,
    id_: str | None,
    wait: bool,
    timeout: str,
    output: str | None,
    dry_run: bool,
    **fields: Any,
) -> int:
    """Deploy MODEL: a base model URI (hf://org/name, s3://..., pvc://..., file:///...), a ModelVersion
    (live merge) or accounts/<namespace>/models/<name>."""
    with reporting():
        ref = m.parse_model(model)
        id_namespace, name = m.parse_deployment_ref(id_) if id_ else (None, m.default_deployment_id(ref))
        namespace = m.one_namespace(settings.namespace, ref.namespace, id_namespace)
        doc = m.deployment_manifest(name, namespace, ref, _options(fields))
        if dry_run:
            echo_doc(doc, output or "yaml")
            return ExitCode.OK
        kube = settings.kube(namespace)
        doc["metadata"]["namespace"] = kube.namespace
        created = kube.create(m.DEPLOYMENT.plural, doc)
    if not output:
        _deployment_done(created, "created", kube.namespace)
    code = follow(kube, m.DEPLOYMENT, name, timeout) if wait else ExitCode.OK
    if output:
        echo_doc(views.clean(kube.get(m.DEPLOYMENT.plural, name) if wait else created), output)
    return code


@update.command("deployment", epilog=EXIT_CODES_HELP)
@click.argument("id_", metavar="ID")
@deployment_options
@wait_options
@output_option
@kube_options
@click.pass_obj
def update_deployment(
    settings: Settings, /, id_: str, wait: bool, timeout: str, output: str | None, **fields: Any
) -> int:
    """Change the given fields of Deployment ID (the others stay as they are)."""
    with reporting():
        namespace, name = m.parse_deployment_ref(id_)
        kube = settings.kube(m.one_namespace(settings.namespace, namespace))
        live = kube.get(m.DEPLOYMENT.plural, name)
        updated = kube.patch(m.DEPLOYMENT.plural, name, m.deployment_patch(live, _options(fields)))
    if not output:
        _deployment_done(updated, "updated", kube.namespace)
    code = follow(kube, m.DEPLOYMENT, name, timeout) if wait else ExitCode.OK
    if output:
        echo_doc(views.clean(kube.get(m.DEPLOYMENT.plural, name) if wait else updated), output)
    return code


@scale.command("deployment", epilog=EXIT_CODES_HELP)
@click.argument("id_", metavar="ID")
@click.option("--replicas", type=click.IntRange(min=0), required=True, help="desired replicas")
@wait_options
@kube_options
@click.pass_obj
def scale_deployment(settings: Settings, id_: str, replicas: int, wait: bool, timeout: str) -> int:
    """Set Deployment ID's replicas. The operator keeps them within [min, max] and the autoscaler may change
    them again."""
    with reporting():
        namespace, name = m.parse_deployment_ref(id_)
        kube = settings.kube(m.one_namespace(settings.namespace, namespace))
        spec = kube.get(m.DEPLOYMENT.plural, name).get("spec") or {}
        kube.scale(m.DEPLOYMENT.plural, name, replicas)
    low = int(spec.get("minReplicas") or 0)
    high = spec.get("maxReplicas") or (1 if low == 0 else low)
    note = "" if low <= replicas <= int(high) else f" (outside [{low}, {high}]: the operator keeps it within)"
    stdout().print(f"scaled Deployment {name} to {replicas} replicas{note}", markup=False)
    return follow(kube, m.DEPLOYMENT, name, timeout) if wait else ExitCode.OK


# -- get / list / delete, for each kind --------------------------------------------------------------------
def _table(kind: m.Kind, objs: list[dict[str, Any]]) -> None:
    headers, row = views.COLUMNS[kind.kind]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    for obj in objs:
        table.add_row(*row(obj))
    console = stdout()
    if not console.is_terminal:
        console = Console(width=1000, highlight=False)  # a pipe: never wrap or cut cells
    console.print(table)


def _show_one(kind: m.Kind, obj: dict[str, Any]) -> None:
    _table(kind, [obj])
    console = stdout()
    for type_ in ("Ready", "Reconciling", "Stalled"):
        cond = views.condition(obj, type_)
        if cond:
            reason, message = str(cond.get("reason") or ""), str(cond.get("message") or "")
            text = message if message.startswith(reason) else f"{reason}: {message}"
            line = f"  {type_}={cond.get('status')} {text}"
            console.print(line, markup=False)


def _register_readers(key: str, kind: m.Kind) -> None:
    @get.command(key, epilog=EXIT_CODES_HELP, help=f"Show {kind.kind} NAME.")
    @click.argument("name")
    @output_option
    @kube_options
    @click.pass_obj
    def get_one(settings: Settings, name: str, output: str | None) -> None:
        with reporting():
            namespace, short = m.parse_deployment_ref(name) if kind is m.DEPLOYMENT else (None, name)
            obj = settings.kube(m.one_namespace(settings.namespace, namespace)).get(kind.plural, short)
        if output:
            echo_doc(views.clean(obj), output)
        else:
            _show_one(kind, obj)

    @list_.command(key, epilog=EXIT_CODES_HELP, help=f"List the {kind.kind}s of the namespace.")
    @output_option
    @kube_options
    @click.pass_obj
    def list_all(settings: Settings, output: str | None) -> None:
        with reporting():
            objs = settings.kube().list(kind.plural)
        if output:
            echo_doc({"apiVersion": "v1", "kind": "List", "items": [views.clean(o) for o in objs]}, output)
        else:
            _table(kind, objs)

    @delete.command(key, epilog=EXIT_CODES_HELP, help=f"Delete {kind.kind} NAME.")
    @click.argument("name")
    @wait_options
    @kube_options
    @click.pass_obj
    def delete_one(settings: Settings, name: str, wait: bool, timeout: str) -> int:
        with reporting():
            namespace, short = m.parse_deployment_ref(name) if kind is m.DEPLOYMENT else (None, name)
            kube = settings.kube(m.one_namespace(settings.namespace, namespace))
            kube.delete(kind.plural, short)
        stdout().print(f"deleting {kind.kind} {short} in {kube.namespace}", markup=False)
        return follow(kube, kind, short, timeout, until_gone=True) if wait else ExitCode.OK


for _key, _kind in KINDS.items():
    _register_readers(_key, _kind)


# -- model versions ----------------------------------------------------------------------------------------
def _adapter_rank(directory: Path) -> int | None:
    config = directory / "adapter_config.json"
    try:
        rank = json.loads(config.read_text()).get("r")
    except (OSError, ValueError):
        return None
    return rank if isinstance(rank, int) else None


@create.command("model-version", epilog=EXIT_CODES_HELP)
@click.argument("name")
@click.option("--base", "base_model", required=True, help="the base model URI the adapter was trained on")
@click.option("--base-revision", help="its exact revision, a commit or digest (default for file:// bases: local)")
@click.option("--adapter", required=True, help="a local adapter directory (its digest is computed) or a URI")
@click.option("--version", help="v<N> (default: from NAME, e.g. support-bot-v3)")
@click.option("--rank", type=int, help="LoRA rank (default: from a local adapter_config.json)")
@click.option("--digest", help="sha256:<hex> of a remote adapter")
@click.option("--system-prompt", help="the system prompt pinned to this version")
@output_option
@click.option("--dry-run", is_flag=True, help="print the CR instead of creating it")
@kube_options
@click.pass_obj
def create_model_version(
    settings: Settings,
    name: str,
    base_model: str,
    base_revision: str | None,
    adapter: str,
    version: str | None,
    rank: int | None,
    digest: str | None,
    system_prompt: str | None,
    output: str | None,
    dry_run: bool,
) -> int:
    """Create ModelVersion NAME: an immutable adapter version (peft format) pinned to its base model."""
    with reporting():
        if "://" not in adapter:
            directory = Path(adapter).resolve()
            try:
                digest = directory_digest(directory)
            except (OSError, ValueError) as exc:
                raise CliError([f"--adapter: {exc}"], ExitCode.USAGE) from None
            rank = rank if rank is not None else _adapter_rank(directory)
            adapter = directory.as_uri()
        doc = m.model_version_manifest(
            name,
            settings.namespace,
            version=version,
            base_model=base_model,
            base_revision=base_revision,
            adapter_uri=adapter,
            digest=digest,
            rank=rank,
            system_prompt=system_prompt,
        )
        if dry_run:
            echo_doc(doc, output or "yaml")
            return ExitCode.OK
        kube = settings.kube()
        doc["metadata"]["namespace"] = kube.namespace
        created = kube.create(m.MODEL_VERSION.plural, doc)
    if output:
        echo_doc(views.clean(created), output)
    else:
        spec = created["spec"]
        stdout().print(
            f"created ModelVersion {name} ({spec['version']}, {spec['adapter'].get('digest', 'no digest')})",
            markup=False,
        )
    return ExitCode.OK


# -- LoRA addons -------------------------------------------------------------------------------------------
def _addon_line(obj: dict[str, Any], verb: str) -> str:
    spec = obj.get("spec") or {}
    where = f"deployment {spec['deployment']}" if spec.get("deployment") else "the serverless pool"
    targets = ", ".join(f"{t['modelVersion']} {t['weight']}%" for t in spec.get("targets") or [])
    model = views.addon_model(obj)
    call = f": call it as model={model!r}" if model else " (model=<addon>#<pool>: see get addon)"
    return f"{verb} addon {obj['metadata']['name']} on {where} [{targets}]{call}"


@cli.command("load-lora", epilog=EXIT_CODES_HELP)
@click.argument("model")
@click.option(
    "--deployment", "deployment_id", metavar="ID", help="a Deployment with --enable-addons (default: serverless)"
)
@click.option("--name", help="the addon's name (default: MODEL without its -v<N> suffix)")
@wait_options
@output_option
@click.option("--dry-run", is_flag=True, help="print the LoraAddon instead of creating it")
@kube_options
@click.pass_obj
def load_lora(
    settings: Settings,
    model: str,
    deployment_id: str | None,
    name: str | None,
    wait: bool,
    timeout: str,
    output: str | None,
    dry_run: bool,
) -> int:
    """Load ModelVersion MODEL as a LoraAddon on Deployment ID, or on the serverless pool of its base model."""
    with reporting():
        ref = m.parse_model(model)
        if ref.model_version is None:
            raise m.Refused(["MODEL: load-lora loads a ModelVersion (create one with create model-version)"])
        dep_namespace, deployment = m.parse_deployment_ref(deployment_id) if deployment_id else (None, None)
        namespace = m.one_namespace(settings.namespace, ref.namespace, dep_namespace)
        addon = name or m.default_addon_name(ref.model_version)
        doc = m.addon_manifest(addon, namespace, ref.model_version, deployment)
        if dry_run:
            echo_doc(doc, output or "yaml")
            return ExitCode.OK
        kube = settings.kube(namespace)
        kube.get(m.MODEL_VERSION.plural, ref.model_version)  # not found: say so now, not in the addon's status
        doc["metadata"]["namespace"] = kube.namespace
        try:
            created = kube.create(m.LORA_ADDON.plural, doc)
        except KubeError as exc:
            if exc.status == 409:
                raise CliError(
                    [f"addon {addon} exists: shift its traffic with `loraserve set-traffic {addon} ...`"],
                    ExitCode.CONFLICT,
                ) from None
            raise
    if not output:
        stdout().print(_addon_line(created, "loaded"), markup=False)
    code = follow(kube, m.LORA_ADDON, addon, timeout) if wait else ExitCode.OK
    if output:
        echo_doc(views.clean(kube.get(m.LORA_ADDON.plural, addon) if wait else created), output)
    elif wait and code == ExitCode.OK:
        stdout().print(_addon_line(kube.get(m.LORA_ADDON.plural, addon), "ready:"), markup=False)
    return code


@cli.command("unload-lora", epilog=EXIT_CODES_HELP)
@click.argument("name")
@click.option("--deployment", "deployment_id", metavar="ID", help="only if the addon is on this Deployment")
@kube_options
@click.pass_obj
def unload_lora(settings: Settings, name: str, deployment_id: str | None) -> int:
    """Unload addon NAME (or the addon load-lora made for ModelVersion NAME): deletes the LoraAddon."""
    with reporting():
        ref = m.parse_model(name)
        if ref.model_version is None:
            raise m.Refused(["NAME: an addon or ModelVersion name"])
        ref_namespace, short = ref.namespace, ref.model_version
        dep_namespace, deployment = m.parse_deployment_ref(deployment_id) if deployment_id else (None, None)
        kube = settings.kube(m.one_namespace(settings.namespace, ref_namespace, dep_namespace))
        obj = kube.find(m.LORA_ADDON.plural, short) or kube.find(m.LORA_ADDON.plural, m.default_addon_name(short))
        if obj is None:
            raise CliError([f"no addon {short} in {kube.namespace}"], ExitCode.NOT_FOUND)
        on = addon_deployment(obj)
        if deployment is not None and on != deployment:
            raise CliError(
                [f"addon {obj['metadata']['name']} is on {on or 'the serverless pool'}, not {deployment}"],
                ExitCode.NOT_FOUND,
            )
        kube.delete(m.LORA_ADDON.plural, obj["metadata"]["name"])
    stdout().print(f"unloaded addon {obj['metadata']['name']}", markup=False)
    return ExitCode.OK


def _retarget(
    settings: Settings, addon: str, make: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    kube = settings.kube()
    live = kube.get(m.LORA_ADDON.plural, addon)
    versions = {o["metadata"]["name"]: o.get("spec") or {} for o in kube.list(m.MODEL_VERSION.plural)}
    result: dict[str, Any] = kube.patch(m.LORA_ADDON.plural, addon, make(live, versions))
    return result


@cli.command("set-traffic", epilog=EXIT_CODES_HELP)
@click.argument("addon")
@click.argument("weights", nargs=-1, required=True)
@output_option
@kube_options
@click.pass_obj
def set_traffic(settings: Settings, addon: str, weights: tuple[str, ...], output: str | None) -> int:
    """Split ADDON's traffic: VERSION=WEIGHT ... (v3=90 v2=10; versions or ModelVersion names; sum 100)."""
    with reporting():
        pairs = m.parse_traffic(weights)
        updated = _retarget(settings, addon, lambda live, versions: m.traffic_patch(live, pairs, versions))
    if output:
        echo_doc(views.clean(updated), output)
    else:
        stdout().print(_addon_line(updated, "traffic of"), markup=False)
    return ExitCode.OK


@cli.command("rollback", epilog=EXIT_CODES_HELP)
@click.argument("addon")
@click.option("--to", "to", required=True, metavar="VERSION", help="v<N> or a ModelVersion name")
@output_option
@kube_options
@click.pass_obj
def rollback(settings: Settings, addon: str, to: str, output: str | None) -> int:
    """Send all of ADDON's traffic to VERSION (a pointer flip: the others stay loaded for a grace period)."""
    with reporting():
        updated = _retarget(settings, addon, lambda live, versions: m.rollback_patch(live, to, versions))
    if output:
        echo_doc(views.clean(updated), output)
    else:
        stdout().print(_addon_line(updated, "rolled back"), markup=False)
    return ExitCode.OK
