"""Runs a bound pod's containers as local processes, each pod in its own network namespace with its pod IP
(not loopback: EndpointSlice validation refuses 127.0.0.0/8), joined to a bridge on the host. The operator
and router on the host then reach pods at their pod IPs exactly as in a cluster.

Only what the model-server pods need is supported: emptyDir volumes (a directory per pod), env values and
Secret references, httpGet readiness probes, restart on exit. Container commands map to local programs:
`python3 -m vllm...` runs in the vLLM CPU virtualenv, `loraserve-fetch` in this package's Python.
Needs root (ip netns). Not supported locally: images (ignored), PVC volumes, users (processes run as the
agent's user), resource limits.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("loraserve.runtime")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Bridge:
    """One Linux bridge for all fake nodes of an agent, holding each node's gateway address."""

    name: str
    gateways: dict[str, str] = field(default_factory=dict)  # cidr -> gateway ip

    def ensure(self) -> None:
        if _ip("link", "show", self.name, check=False).returncode != 0:
            _ip("link", "add", self.name, "type", "bridge")
        _ip("link", "set", self.name, "up")

    def add_cidr(self, cidr: str) -> str:
        if cidr not in self.gateways:
            net = ipaddress.ip_network(cidr)
            gateway = str(net[1])
            _ip("addr", "replace", f"{gateway}/{net.prefixlen}", "dev", self.name)
            self.gateways[cidr] = gateway
        return self.gateways[cidr]

    def delete(self) -> None:
        _ip("link", "del", self.name, check=False)


@dataclass
class PodNetwork:
    netns: str
    veth: str
    ip: str

    @classmethod
    def create(cls, bridge: Bridge, key: str, ip: str, cidr: str) -> PodNetwork:
        gateway = bridge.add_cidr(cidr)
        prefix = ipaddress.ip_network(cidr).prefixlen
        netns, veth = f"{bridge.name}-{key}", f"v{key}"[:15]
        _ip("netns", "del", netns, check=False)
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", bridge.name, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", gateway)
        return cls(netns, veth, ip)

    def delete(self) -> None:
        _ip("netns", "del", self.netns, check=False)
        _ip("link", "del", self.veth, check=False)


@dataclass
class ContainerState:
    name: str
    image: str
    ready: bool = False
    started: bool = False
    restarts: int = 0
    waiting_reason: str | None = None
    waiting_message: str = ""
    process: subprocess.Popen[bytes] | None = None
    spawned_at: float = 0.0
    back_off: float = 0.0  # the kubelet's crash back-off: 10 s, doubling up to 5 min, reset after 10 min up
    restart_at: float | None = None
    last_exit: int | None = None


CRASH_BACK_OFF_FIRST = 10.0
CRASH_BACK_OFF_MAX = 300.0
CRASH_BACK_OFF_RESET = 600.0


def local_command(container: dict[str, Any], vllm_python: str | None) -> list[str] | None:
    """The program a container means here, or None when it cannot run locally."""
    command = list(container.get("command") or []) + list(container.get("args") or [])
    if not command:
        return None
    if command[0] in ("python", "python3"):
        module = command[2] if len(command) > 2 and command[1] == "-m" else ""
        if module.startswith("vllm"):
            return [vllm_python, *command[1:]] if vllm_python else None
        return [sys.executable, *command[1:]]
    if command[0] == "loraserve-fetch":
        return [sys.executable, "-m", "loraserve.fetcher", *command[1:]]
    return None


def rewrite_paths(value: str, mounts: dict[str, str]) -> str:
    """Map container paths under a volume mount to the pod's host directory for that volume."""
    for mount in sorted(mounts, key=len, reverse=True):
        host = mounts[mount]
        if value == mount or value.startswith(mount + "/"):
            return host + value[len(mount) :]
        for sep in ("=",):
            prefix, _, rest = value.partition(sep)
            if rest and (rest == mount or rest.startswith(mount + "/")):
                return f"{prefix}{sep}{host}{rest[len(mount) :]}"
    return value


class PodRunner:
    """Runs one pod: init containers in order, then the containers, restarting them when they exit,
    and reports readiness from the httpGet probes. `on_change` is called when the status changes."""

    def __init__(
        self,
        pod: dict[str, Any],
        network: PodNetwork,
        pod_dir: Path,
        vllm_python: str | None,
        resolve_secret: Callable[[str, str, str], str | None],
        on_change: Callable[[PodRunner], None],
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.pod = pod
        self.network = network
        self.pod_dir = pod_dir
        self.vllm_python = vllm_python
        self.resolve_secret = resolve_secret
        self.on_change = on_change
        self.extra_env = extra_env or {}
        spec = pod["spec"]
        self.init = [ContainerState(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []]
        self.containers = [ContainerState(c["name"], c.get("image", "")) for c in spec["containers"]]
        self.initialized = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"pod-{pod['metadata']['name']}")

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    def start(self) -> None:
        self.thread.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop the pod. With `grace` (the pod was deleted through the API), in the kubelet's order: report it
        not ready, run each container's preStop hook, then SIGTERM, and SIGKILL what is left when the grace
        period is over. Without it (the node going away), SIGTERM at once."""
        self.stopped.set()
        deadline = time.monotonic() + (grace if grace is not None else 15.0)
        if grace is not None:
            for state in self.containers:
                state.ready = False
            self.on_change(self)
            hooks = [  # the kubelet runs a preStop hook only in a container that is running
                threading.Thread(target=self._pre_stop, args=(container, deadline), daemon=True)
                for container, state in zip(self.pod["spec"]["containers"], self.containers, strict=True)
                if ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec")
                and state.process is not None
                and state.process.poll() is None
            ]
            for hook in hooks:
                hook.start()
            for hook in hooks:
                hook.join(max(0.0, deadline - time.monotonic()))
        for state in self.containers + self.init:
            self._kill(state, max(1.0, deadline - time.monotonic()))
        self.thread.join(30)
        self.network.delete()
        shutil.rmtree(self.pod_dir, ignore_errors=True)

    def _pre_stop(self, container: dict[str, Any], deadline: float) -> None:
        pod, name = self.pod["metadata"]["name"], container["name"]
        hook = {**container, "command": container["lifecycle"]["preStop"]["exec"]["command"], "args": []}
        prepared = self._in_pod(hook)
        if prepared is None:
            log.warning("pod %s: no local program for the preStop hook of %s", pod, name)
            return
        argv, env = prepared
        with open(self.pod_dir / f"{name}.prestop.log", "ab") as out:
            try:
                subprocess.run(
                    argv,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.pod_dir,
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                )
            except subprocess.TimeoutExpired:
                log.warning("pod %s: preStop of %s outlived the grace period", pod, name)

    def _in_pod(self, container: dict[str, Any]) -> tuple[list[str], dict[str, str]] | None:
        """The container's program as run here (in the pod's network namespace, volume paths mapped to the pod's
        folders) and its environment; None when it has no local program."""
        argv = local_command(container, self.vllm_python)
        if argv is None:
            return None
        mounts = self._mounts(container)
        argv = [argv[0], *(rewrite_paths(a, mounts) for a in argv[1:])]
        return ["ip", "netns", "exec", self.network.netns, *argv], self._env(container, mounts)

    def _mounts(self, container: dict[str, Any]) -> dict[str, str]:
        out = {}
        for mount in container.get("volumeMounts") or []:
            host = self.pod_dir / "volumes" / mount["name"]
            host.mkdir(parents=True, exist_ok=True)
            out[mount["mountPath"]] = str(host)
        return out

    def _env(self, container: dict[str, Any], mounts: dict[str, str]) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.pod_dir), **self.extra_env}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = rewrite_paths(str(var["value"]), mounts)
            elif ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
                value = self.resolve_secret(self.namespace, ref["name"], ref["key"])
                if value is not None:
                    env[var["name"]] = value
        return env

    def _spawn(self, container: dict[str, Any], state: ContainerState) -> bool:
        prepared = self._in_pod(container)
        if prepared is None:
            state.waiting_reason = "UnsupportedLocally"
            state.waiting_message = f"no local program for container {container['name']!r}"
            return False
        argv, env = prepared
        log_path = self.pod_dir / f"{container['name']}.log"
        with open(log_path, "ab") as out:
            state.process = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.pod_dir,
                start_new_session=True,
            )
        state.started = True
        state.waiting_reason = None
        state.spawned_at = time.monotonic()
        return True

    def _crashed(self, state: ContainerState) -> None:
        """A container exited: restart it after the kubelet's back-off, showing CrashLoopBackOff meanwhile."""
        assert state.process is not None
        now = time.monotonic()
        up = now - state.spawned_at
        state.back_off = (
            CRASH_BACK_OFF_FIRST
            if up >= CRASH_BACK_OFF_RESET or not state.back_off
            else min(state.back_off * 2, CRASH_BACK_OFF_MAX)
        )
        state.restarts += 1
        state.ready = False
        state.last_exit = state.process.returncode
        state.restart_at = now + state.back_off
        state.waiting_reason = "CrashLoopBackOff"
        pod = self.pod["metadata"]["name"]
        state.waiting_message = f"back-off {state.back_off:.0f}s restarting failed container={state.name} pod={pod}"
        log.warning(
            "pod %s container %s exited with %s; restarting in %.0fs",
            self.pod["metadata"]["name"],
            state.name,
            state.last_exit,
            state.back_off,
        )

    @staticmethod
    def _kill(state: ContainerState, grace: float = 15.0) -> None:
        proc = state.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def _probe(self, container: dict[str, Any]) -> bool:
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        proc = next(s for s in self.containers if s.name == container["name"]).process
        if proc is None or proc.poll() is not None:
            return False
        if not probe:
            return True
        port = probe["port"]
        if isinstance(port, str) and not port.isdigit():
            port = next(p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port)
        try:
            with urllib.request.urlopen(f"http://{self.network.ip}:{port}{probe.get('path', '/')}", timeout=2) as r:
                return bool(200 <= r.status < 400)
        except OSError:
            return False

    def _run(self) -> None:
        spec = self.pod["spec"]
        for container, state in zip(spec.get("initContainers") or [], self.init, strict=True):
            if self.stopped.is_set() or not self._spawn(container, state):
                self.on_change(self)
                return
            self.on_change(self)
            assert state.process is not None
            while state.process.poll() is None and not self.stopped.is_set():
                time.sleep(0.5)
            if state.process.returncode != 0:
                state.waiting_reason = "InitFailed"
                state.waiting_message = f"exit code {state.process.returncode}"
                self.on_change(self)
                return
        self.initialized = True
        for container, state in zip(spec["containers"], self.containers, strict=True):
            self._spawn(container, state)
        self.on_change(self)
        while not self.stopped.wait(1.0):
            changed = False
            for container, state in zip(spec["containers"], self.containers, strict=True):
                if state.restart_at is None and state.process is not None and state.process.poll() is not None:
                    self._crashed(state)
                    changed = True
                if state.restart_at is not None and time.monotonic() >= state.restart_at:
                    state.restart_at = None
                    self._spawn(container, state)
                    changed = True
                ready = self._probe(container)
                if ready != state.ready:
                    state.ready = ready
                    changed = True
            if changed:
                self.on_change(self)

    def container_statuses(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

        def one(state: ContainerState, init: bool) -> dict[str, Any]:
            if state.waiting_reason or state.process is None:
                st: dict[str, Any] = {
                    "waiting": {"reason": state.waiting_reason or "PodInitializing", "message": state.waiting_message}
                }
            elif state.process.poll() is None:
                st = {"running": {"startedAt": now}}
            else:
                st = {
                    "terminated": {
                        "exitCode": state.process.returncode,
                        "startedAt": now,
                        "finishedAt": now,
                        "reason": "Completed" if state.process.returncode == 0 else "Error",
                    }
                }
            if state.last_exit is not None:
                st_last = {"terminated": {"exitCode": state.last_exit, "reason": "Error", "finishedAt": now}}
            out = {
                "lastState": st_last if state.last_exit is not None else {},
                "name": state.name,
                "image": state.image,
                "imageID": state.image,
                "restartCount": state.restarts,
                "ready": state.ready if not init else st.get("terminated", {}).get("exitCode") == 0,
                "state": st,
            }
            if not init:
                out["started"] = state.started
            return out

        return [one(s, False) for s in self.containers], [one(s, True) for s in self.init]
