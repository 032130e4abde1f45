"""`loraserve local up | down` as a new user runs it, on real pieces: the control plane, a node whose pods run
vLLM for CPU, the operator and the router. `up` runs the README's quick start (the demo model: base and
adapter answer differently), its `curl` and `openai` snippets work as printed; the SDK deploys an on-demand
base with two on-demand-lora models on it (no tolerations, no region: the stack's node takes them as a
cluster would) and chats through the router; `--model DIR --adapter DIR` serves a model of the user's own;
SIGTERM, SIGHUP and SIGKILL to the stack then `down` or the
next `up` leave no process and no network namespace.

The tests of this module run in order on one stack (the last ones stop it)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraserve.local import demo_model, stack, trial
from loraserve.local.cluster import free_port
from loraserve.sdk import LLM
from tests.fixtures.models import adapter_dirs, tiny_model_dir
from tests.fixtures.vllm_server import vllm_python
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.vllm, pytest.mark.slow]


def loraserve(*args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraserve.cli.main", *args],
        env={**os.environ, "LORASERVE_VLLM_PYTHON": vllm_python(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def running(state_dir: Path) -> stack.State:
    state = stack.State.read(state_dir)
    assert state is not None, "the stack wrote no state"
    return state


def nothing_left(state_dir: Path) -> bool:
    left = stack.find_leftovers(state_dir)
    return not left and not [n for n in _netns() if n.startswith(stack.bridge_name(state_dir))]


def _netns() -> list[str]:
    return [
        line.split()[0]
        for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
        if line
    ]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: dead
    except OSError:
        return True


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("local-stack")
    yield folder
    loraserve("local", "down", f"--dir={folder}")


@pytest.fixture(scope="module")
def up(state_dir: Path) -> subprocess.CompletedProcess[str]:
    return ok(loraserve("local", "up", f"--dir={state_dir}", f"--router-port={free_port()}"))


def test_up_runs_the_quick_start_and_base_and_adapter_answer_differently(
    up: subprocess.CompletedProcess[str],
) -> None:
    out = up.stdout
    for command in trial.commands([demo_model.ADAPTER]):
        assert f"$ {command}" in out, out
    # The CLI's own progress, as a person sees it.
    assert "✓ demo: READY · 1/1 ready" in up.stderr, up.stderr
    answers = dict(re.findall(r"^\s+(\S+#demo): '(.*)'$", out, re.M))
    texts = {voice: dict(pairs) for voice, pairs in demo_model.read_texts().items()}
    question = demo_model.questions()[0]
    assert answers["demo-llama#demo"] == texts["base"][question], out
    assert answers["pirate#demo"] == texts[demo_model.ADAPTER][question], out


def test_the_printed_snippets_work(up: subprocess.CompletedProcess[str]) -> None:
    out = up.stdout
    pirate = dict(demo_model.read_texts()[demo_model.ADAPTER])[demo_model.questions()[0]]
    curl = out[out.index("curl -s") :].split("\nfrom openai")[0].replace("\\\n", " ")
    answered = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True).stdout)
    assert answered["choices"][0]["message"]["content"].strip() == pirate
    python = out[out.index("from openai") :].split("print(answer.choices[0].message.content)")[0]
    python += "print(answer.choices[0].message.content)"
    printed = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == pirate


def test_sdk_on_demand_base_with_two_loras_through_the_router(
    up: subprocess.CompletedProcess[str], state_dir: Path
) -> None:
    state = running(state_dir)
    model = demo_model.demo_model(vllm_python())
    env = {"KUBECONFIG": state.kubeconfig}
    base_uri = f"file://{model.base}"
    # A second adapter for the same shapes (q_proj, v_proj of a 128-wide, 2-layer Llama), from the test fixtures.
    ok(
        loraserve(
            "create",
            "model-version",
            "tutor-v1",
            "--base",
            base_uri,
            "--adapter",
            str(adapter_dirs()["alpha"]),
            env=env,
        )
    )
    common: dict[str, Any] = {"kubeconfig": state.kubeconfig, "router_url": state.router_url, "timeout": 900}
    # Nothing local-specific: no toleration, no region. The stack's node takes it as a GPU cluster's would.
    base = LLM(
        base_uri,
        "on-demand",
        id="sdk-base",
        enable_addons=True,
        min_replicas=1,
        extra_args=["--max-model-len=512", "--dtype=float32"],
        **common,
    ).apply()
    assert base.state == "READY"
    pirate = LLM("pirate-v1", "on-demand-lora", base_id="sdk-base", id="sdk-pirate", **common).apply()
    tutor = LLM("tutor-v1", "on-demand-lora", base_id="sdk-base", **common).apply()
    assert (pirate.state, tutor.state) == ("READY", "READY")
    question = demo_model.questions()[1]
    texts = {voice: dict(pairs) for voice, pairs in demo_model.read_texts().items()}

    def chat(llm: LLM) -> str:
        answer = llm.chat.completions.create(
            messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0
        )
        return str(answer.choices[0].message.content).strip()

    assert chat(base) == texts["base"][question]
    assert chat(pirate) == texts[demo_model.ADAPTER][question]
    assert chat(tutor)  # another adapter, served on the same replica
    assert base.router_model == "demo-llama#accounts/default/deployments/sdk-base"
    for llm in (pirate, tutor, base):
        llm.delete(wait=True, timeout=300)
        assert llm.state is None


def test_sigterm_to_the_stack_leaves_nothing(up: subprocess.CompletedProcess[str], state_dir: Path) -> None:
    state = running(state_dir)
    before = stack.find_leftovers(state_dir)
    assert before.netns, "the demo Deployment's pod runs in a network namespace"
    assert state.pid in before.processes
    os.kill(state.pid, signal.SIGTERM)
    wait_for(lambda: nothing_left(state_dir), timeout=180, message=lambda: stack.find_leftovers(state_dir).describe())
    # A process still tearing down its memory is no longer listed as the stack's (its environment cannot be
    # read) but is not dead yet: each one seen before must end within moments.
    wait_for(
        lambda: all(_dead(pid) for pid in before.processes),
        timeout=60,
        message=lambda: f"still running: { {p: _cmdline(p) for p in before.processes if not _dead(p)} }",
    )
    assert "nothing was running" in ok(loraserve("local", "down", f"--dir={state_dir}")).stdout


def _up_with_a_readme_pod(state_dir: Path) -> tuple[stack.State, stack.Leftovers]:
    """`up --no-demo`, then a Deployment written from the README (kubectl apply), running its pod."""
    ok(loraserve("local", "up", "--no-demo", f"--dir={state_dir}", f"--router-port={free_port()}"))
    state = running(state_dir)
    model = demo_model.demo_model(vllm_python())
    manifest = {
        "apiVersion": "serving.loraserve.dev/v1alpha1",
        "kind": "Deployment",
        "metadata": {"name": "mine"},
        "spec": {"baseModel": f"file://{model.base}", "minReplicas": 1, "extraArgs": ["--dtype=float32"]},
    }
    kubectl = [str(Path(state.bin_dir) / "kubectl"), f"--kubeconfig={state.kubeconfig}"]
    subprocess.run([*kubectl, "apply", "-f", "-"], input=yaml.safe_dump(manifest), text=True, check=True)
    wait_for(lambda: stack.find_leftovers(state_dir).netns, timeout=180, message="the pod's network namespace")
    # The pod's processes (the fetcher, then vLLM) run inside it.
    wait_for(
        lambda: any(stack._netns_pids(n) for n in stack.find_leftovers(state_dir).netns),
        timeout=120,
        message="a process in the pod's namespace",
    )
    return state, stack.find_leftovers(state_dir)


def test_sigkill_leftovers_are_cleared_by_down_and_by_the_next_up(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    try:
        # A model directory of the user's own, with an adapter (here the tests' tiny Llama): the quick start
        # runs on it. Then SIGKILL: nothing stops in order; `down` finds and clears it all.
        up = ok(
            loraserve(
                "local",
                "up",
                f"--model={tiny_model_dir()}",
                f"--adapter=tutor={adapter_dirs()['alpha']}",
                f"--dir={state_dir}",
                f"--router-port={free_port()}",
            )
        )
        answers = dict(re.findall(r"^\s+(\S+#demo): '(.*)'$", up.stdout, re.M))
        assert set(answers) == {f"{tiny_model_dir().name}#demo", "tutor#demo"}, up.stdout
        assert "file://$MODEL" in up.stdout
        assert f"export MODEL={tiny_model_dir()}" in up.stdout
        state = running(state_dir)
        os.kill(state.pid, signal.SIGKILL)
        wait_for(lambda: _dead(state.pid), timeout=10, message="the supervisor gone")
        left = stack.find_leftovers(state_dir)
        # etcd, the apiserver, ..., the operator, the router, the pod's processes: all still there.
        assert left.netns, left
        assert len(left.processes) >= 5, left
        down = ok(loraserve("local", "down", f"--dir={state_dir}"))
        assert "stopped: nothing left running" in down.stdout
        assert nothing_left(state_dir)
        assert all(_dead(pid) for pid in left.processes)

        # SIGKILL again; this time the next `up` clears it before starting; then SIGHUP stops that one.
        state, before = _up_with_a_readme_pod(state_dir)
        os.kill(state.pid, signal.SIGKILL)
        wait_for(lambda: _dead(state.pid), timeout=10, message="the supervisor gone")
        again = ok(loraserve("local", "up", "--no-demo", f"--dir={state_dir}", f"--router-port={free_port()}"))
        assert "cleared what an earlier stack left" in again.stdout
        assert all(_dead(pid) for pid in before.processes)
        assert not set(before.netns) & set(_netns())
        fresh = running(state_dir)
        os.kill(fresh.pid, signal.SIGHUP)
        wait_for(
            lambda: nothing_left(state_dir), timeout=180, message=lambda: stack.find_leftovers(state_dir).describe()
        )
    finally:
        loraserve("local", "down", f"--dir={state_dir}")


def test_foreground_up_stops_the_stack_when_its_terminal_goes(tmp_path: Path) -> None:
    state_dir = tmp_path / "stack"
    up = subprocess.Popen(
        [
            *(sys.executable, "-m", "loraserve.cli.main", "local", "up", "--no-demo", "--foreground"),
            *(f"--dir={state_dir}", f"--router-port={free_port()}"),
        ],
        env={**os.environ, "LORASERVE_VLLM_PYTHON": vllm_python()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        state = wait_for(lambda: stack.State.read(state_dir), timeout=180, message="the stack up")
        # The state is written as the stack starts; the node agent makes the pods' bridge a moment later.
        wait_for(lambda: stack.find_leftovers(state_dir).bridge, timeout=120, message="the pods' bridge")
        up.send_signal(signal.SIGHUP)  # what a closed terminal sends
        output, _ = up.communicate(timeout=180)
        assert up.returncode == 130, output
        assert _dead(state.pid)
        assert nothing_left(state_dir)
    finally:
        up.kill()
        loraserve("local", "down", f"--dir={state_dir}")
