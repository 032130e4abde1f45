"""The local trial's pieces that need no cluster: the README shows the very commands `loraserve local up`
runs; the demo texts; the stack's processes are found again from the state directory alone (as after a
SIGKILL of its supervisor) and cleared; the local stack's node takes pods that do not tolerate anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.local import demo_model, stack, trial
from loraserve.local.nodeagent import node_manifest
from tests.fixtures.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]


def readme_quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("loraserve ")]


def test_readme_quick_start_is_what_up_runs() -> None:
    shown = readme_quick_start()
    ran = trial.commands([demo_model.ADAPTER])
    assert [c for c in shown if c in ran] == ran, f"README quick start:\n{shown}\nup runs:\n{ran}"


def test_commands_expand_like_a_shell() -> None:
    env = {"MODEL": "/models/my llama", "ADAPTER": "/a/pirate", "ADAPTER_1": "/a/second"}
    argv = trial.expand(trial.commands(["pirate", "tutor"])[3], env)
    expected = ["loraserve", "create", "model-version", "tutor-v1", "--base"]
    assert argv == [*expected, "file:///models/my llama", "--adapter", "/a/second"]


def test_demo_texts_answer_every_question_in_both_voices() -> None:
    texts = demo_model.read_texts()
    assert set(texts) == {"base", demo_model.ADAPTER}
    questions = [q for q, _ in texts["base"]]
    assert questions == [q for q, _ in texts[demo_model.ADAPTER]]
    assert all(a != b for (_, a), (_, b) in zip(texts["base"], texts[demo_model.ADAPTER], strict=True))


def test_demo_texts_refuse_an_answer_without_a_question(tmp_path: Path) -> None:
    bad = tmp_path / "texts.txt"
    bad.write_text("base: an answer first\n")
    with pytest.raises(ValueError, match=r"texts.txt:1: expected"):
        demo_model.read_texts(bad)


def test_names_are_derived_from_the_state_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert stack.bridge_name(a) == stack.bridge_name(tmp_path / "x" / ".." / "a")
    assert stack.bridge_name(a) != stack.bridge_name(b)
    assert len(stack.bridge_name(a)) <= 15  # Linux interface names


def test_local_node_takes_pods_without_tolerations() -> None:
    untainted = node_manifest("n", "NVIDIA_A100_80GB", 8, "local", "10.244.9.0/24", pool="run", tainted=False)
    assert untainted["spec"]["taints"] == []
    # The test suites' run pools stay tainted: only Deployments that ask land there.
    tainted = node_manifest("n", "NVIDIA_A100_80GB", 8, "local", "10.244.9.0/24", pool="run")
    assert tainted["spec"]["taints"][0]["key"] == "serving.loraserve.dev/local-pool"


def test_a_killed_stack_is_found_from_its_directory_and_cleared(tmp_path: Path) -> None:
    # A process of the stack (it carries the marker), and its child, orphaned as after a SIGKILL of the
    # supervisor; and a bystander without the marker, which must survive.
    env = {**os.environ, stack.MARKER_ENV: stack.marker(tmp_path)}
    piece = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"],
        env=env,
        start_new_session=True,
    )
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        other = stack.find_leftovers(tmp_path / "other")
        assert piece.pid not in other.processes
        # Two processes: the child inherited the marker.
        wait_for(lambda: len(stack.find_leftovers(tmp_path).processes) == 2, timeout=10, message="both found")
        found = stack.find_leftovers(tmp_path)
        assert piece.pid in found.processes
        cleared = stack.clear(tmp_path, grace=1)
        assert sorted(cleared.processes) == sorted(found.processes)
        assert not stack.find_leftovers(tmp_path)
        assert piece.wait(5) == -9
        assert bystander.poll() is None
    finally:
        bystander.kill()
        piece.kill()
