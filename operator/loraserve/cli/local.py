"""`loraserve local up | down | status`: the local trial, the product on one machine (see loraserve.local.stack).

`up` clears what an earlier stack of the same directory left (even one killed with SIGKILL), starts the stack
in the background (its own process, which outlives the terminal), runs the README's quick-start commands with
this CLI, asks base and adapter the same question through the router, and prints `curl` and `openai` snippets.
`down` stops it and checks nothing is left. Needs root (pods run in network namespaces).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click
from rich.console import Console

from loraserve.cli.commands import CliError, ExitCode, cli
from loraserve.local import stack, trial

console = Console(highlight=False, soft_wrap=True)  # commands and snippets stay whole: copied as printed


def default_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME")
    return Path(os.environ.get("LORASERVE_LOCAL_DIR") or Path(state or Path.home() / ".local" / "state") / "loraserve")


dir_option = click.option(
    "--dir",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_dir,
    show_default="$LORASERVE_LOCAL_DIR, else ~/.local/state/loraserve",
    help="the stack's state: data, logs, pods",
)


@cli.group("local")
def local() -> None:
    """The local trial: a real control plane, a GPU node whose pods run vLLM for CPU, the operator, the router."""


def _vllm_python(value: str | None) -> str:
    python = value or os.environ.get("LORASERVE_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        raise CliError(
            ["--vllm-python: the Python of a vLLM virtualenv (or $LORASERVE_VLLM_PYTHON; hack/setup.sh makes one)"],
            ExitCode.USAGE,
        )
    return python


def _adapters(values: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        folder = Path(path if sep else name).expanduser().resolve()
        name = name if sep else folder.name
        if not (folder / "adapter_config.json").is_file():
            raise CliError([f"--adapter {value}: no adapter_config.json in {folder}"], ExitCode.USAGE)
        out[name.lower().replace("_", "-")] = folder
    return out


def _check_model(model: Path) -> None:
    if not (model / "config.json").is_file():
        raise CliError([f"--model {model}: no config.json (a Hugging Face model directory)"], ExitCode.USAGE)


def _check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise CliError([f"--router-port {port}: {exc.strerror} (pick another port)"], ExitCode.USAGE) from None


def _clear(state_dir: Path) -> None:
    left = stack.clear(state_dir)
    if left:
        console.print(f"cleared what an earlier stack left in {state_dir}: {left.describe()}")


def _start(state_dir: Path, router_port: int, python: str) -> stack.State:
    # A fresh cluster every time: an old run's objects would start its pods again.
    for old in ("cluster", "pods", "logs"):
        shutil.rmtree(state_dir / old, ignore_errors=True)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stack.log", "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loraserve.local.stack",
                f"--dir={state_dir}",
                f"--router-port={router_port}",
                f"--vllm-python={python}",
            ],
            env={**os.environ, stack.MARKER_ENV: stack.marker(state_dir), "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives this terminal; `loraserve local down` stops it
        )
    with console.status("starting the control plane, the node, the operator and the router…"):
        while (state := stack.State.read(state_dir)) is None:
            if proc.poll() is not None:
                tail = (logs / "stack.log").read_text(errors="replace")[-3000:]
                raise CliError([f"the local stack stopped ({proc.returncode}):", tail], ExitCode.ERROR)
            time.sleep(0.5)
    return state


def _run(argv: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "loraserve.cli.main", *argv[1:]], env=env, check=False)
    if result.returncode != 0:
        raise CliError([f"{' '.join(argv[:3])} failed with exit code {result.returncode}"], ExitCode.ERROR)


def _ask(t: trial.Trial, model: str) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{t.router_url}/v1", api_key="none", timeout=900, max_retries=0)
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": t.question}], max_tokens=40, temperature=0
    )
    return (answer.choices[0].message.content or "").strip()


@local.command("up")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), help="serve this model directory")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR", help="a peft LoRA adapter (repeat)")
@click.option("--question", help="what to ask base and adapter (default: one the demo model learnt)")
@click.option("--router-port", type=int, default=8080, show_default=True)
@click.option("--vllm-python", help="Python of the vLLM virtualenv (default: $LORASERVE_VLLM_PYTHON)")
@click.option("--no-demo", is_flag=True, help="start the stack only: run no commands")
@click.option("--foreground", is_flag=True, help="stay in the foreground; Ctrl-C stops the stack")
@dir_option
def up(
    model: Path | None,
    adapters: tuple[str, ...],
    question: str | None,
    router_port: int,
    vllm_python: str | None,
    no_demo: bool,
    foreground: bool,
    state_dir: Path,
) -> None:
    """Start the local stack, then run the README's quick start on it (the tiny demo model unless --model)."""
    started = time.monotonic()
    if foreground:
        # A closed terminal (SIGHUP) or a kill (SIGTERM) of this process stops the stack too, as Ctrl-C does.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
    state_dir = state_dir.resolve()
    python = _vllm_python(vllm_python)
    _clear(state_dir)
    _check_port(router_port)
    if model is not None:
        model = model.expanduser().resolve()
        _check_model(model)
        served = _adapters(adapters)
        ask = question or "Hello, who are you?"
    else:
        from loraserve.local.demo_model import demo_model

        with console.status("the demo model (trained once on CPU, then cached)…"):
            demo = demo_model(python)
        model, served = demo.base, {**demo.adapters, **_adapters(adapters)}
        ask = question or demo.questions[0]
    try:
        state = _start(state_dir, router_port, python)  # a signal while it starts stops what has started
        t = trial.Trial(model, served, ask, state.router_url, Path(state.kubeconfig), Path(state.bin_dir))
        console.print(f"[bold]the local stack is up[/] (state in {state_dir}; `loraserve local down` stops it)")
        if not no_demo:
            _demo(t)
            console.print(f"(the last answer came {time.monotonic() - started:.0f}s after `up` started)")
        _snippets(t, no_demo)
        if foreground:
            console.print("running in the foreground: Ctrl-C stops the stack")
            while stack.State.read(state_dir) is not None:
                time.sleep(1)
    except KeyboardInterrupt:
        _down(state_dir)  # Ctrl-C while it starts (or in the foreground) stops it
        raise


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _demo(t: trial.Trial) -> None:
    env = {**os.environ, **t.env(), "PATH": f"{t.bin_dir}:{os.environ.get('PATH', '')}"}
    for i, addon in enumerate(list(t.adapters)[1:], 1):
        env[f"ADAPTER_{i}"] = str(t.adapters[addon])
    for line in trial.exports(t):
        console.print(f"$ {line}", markup=False)
    for command in trial.commands(list(t.adapters)):
        console.print(f"[bold]$ {command}[/]")
        _run(trial.expand(command, env), env)
    console.print(f"\nasking {t.question!r} (the first answer waits for vLLM to warm up):")
    for model in [f"{t.base_name}#{trial.DEPLOYMENT}", *(f"{a}#{trial.DEPLOYMENT}" for a in t.adapters)]:
        console.print(f"  {model:>24}: {_ask(t, model)!r}", markup=False)


def _snippets(t: trial.Trial, no_demo: bool) -> None:
    model = f"{next(iter(t.adapters))}#{trial.DEPLOYMENT}" if t.adapters else f"{t.base_name}#{trial.DEPLOYMENT}"
    console.print("\n[bold]use it[/] (kubectl and the CLI with this KUBECONFIG):")
    console.print(f"export KUBECONFIG={t.kubeconfig} PATH={t.bin_dir}:$PATH", markup=False)
    if no_demo:
        return
    console.print(trial.curl_snippet(t, model), markup=False)
    console.print(trial.python_snippet(t, model), markup=False)


def _down(state_dir: Path) -> stack.Leftovers:
    with console.status("stopping the local stack…"):
        stack.clear(state_dir)
        left = stack.find_leftovers(state_dir)
    if left:
        raise CliError([f"still running after down: {left.describe()} (pids {left.processes})"], ExitCode.ERROR)
    return left


@local.command("down")
@dir_option
def down(state_dir: Path) -> None:
    """Stop the local stack (and whatever a killed one left): no process and no network namespace remain."""
    state_dir = state_dir.resolve()
    running = stack.State.read(state_dir) is not None or bool(stack.find_leftovers(state_dir))
    _down(state_dir)
    console.print("stopped: nothing left running" if running else "nothing was running")


@local.command("status")
@dir_option
def status(state_dir: Path) -> None:
    """Whether the stack runs, its KUBECONFIG and router, and what a killed one left."""
    state_dir = state_dir.resolve()
    state = stack.State.read(state_dir)
    left = stack.find_leftovers(state_dir)
    if state is not None and state.pid in left.processes:
        console.print(f"running (pid {state.pid}): KUBECONFIG={state.kubeconfig} router={state.router_url}/v1")
    elif left:
        console.print(f"not running; left behind: {left.describe()} (`loraserve local down` clears it)")
    else:
        console.print("not running")
