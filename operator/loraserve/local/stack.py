"""The local stack behind `loraserve local up`: the control plane, a node whose pods really run (vLLM for
CPU in network namespaces), the operator and the router, under one supervisor process.

    python -m loraserve.local.stack --dir DIR [--router-port 8080] [--vllm-python PY]   # the supervisor

The supervisor stops everything it started on SIGTERM, SIGHUP and SIGINT. Nothing of a stack is left behind
even when the supervisor is SIGKILLed, because every piece can be found again from the state directory alone:

- every process of the stack carries `LORASERVE_LOCAL_STACK=<marker>` in its environment (the supervisor is
  started with it and its children inherit it; the marker is derived from the state directory's path);
- every pod runs in a network namespace named `<bridge>-<pod uid>`, the bridge named from the same marker,
  and `ip netns pids` names the processes inside (vLLM and its engine, the fetcher).

`clear(dir)` (run by `loraserve local down` and at the start of every `up`) stops the supervisor, then kills
what is still found that way and deletes the namespaces and the bridge.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

MARKER_ENV = "LORASERVE_LOCAL_STACK"
STATE_FILE = "state.json"
NODE = "local-gpu-0"
NODE_REGION = "local"
REPO_CRDS = Path(__file__).resolve().parents[3] / "crds"


def marker(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


def bridge_name(state_dir: Path) -> str:
    """A Linux bridge name (15 characters at most) of this state directory."""
    return "lsl" + marker(state_dir)[:8]


@dataclass
class State:
    """What a running stack writes to `<dir>/state.json` once it is ready to use."""

    pid: int
    kubeconfig: str
    router_url: str
    bin_dir: str

    @classmethod
    def read(cls, state_dir: Path) -> State | None:
        try:
            return cls(**json.loads((state_dir / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None


# -- finding what a stack left ------------------------------------------------------------------------------
@dataclass
class Leftovers:
    processes: list[int]
    netns: list[str]
    bridge: bool

    def __bool__(self) -> bool:
        return bool(self.processes or self.netns or self.bridge)

    def describe(self) -> str:
        return f"{len(self.processes)} process(es), {len(self.netns)} network namespace(s)" + (
            ", a bridge" if self.bridge else ""
        )


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _marked_processes(value: str) -> list[int]:
    needle = f"{MARKER_ENV}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def _namespaces(prefix: str) -> list[str]:
    listed = _ip("netns", "list").stdout.splitlines()
    return [line.split()[0] for line in listed if line.split() and line.split()[0].startswith(prefix + "-")]


def _netns_pids(netns: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", netns).stdout.split() if p.isdigit()]


def find_leftovers(state_dir: Path) -> Leftovers:
    netns = _namespaces(bridge_name(state_dir))
    pids = set(_marked_processes(marker(state_dir)))
    for name in netns:
        pids.update(_netns_pids(name))
    bridge = _ip("link", "show", bridge_name(state_dir)).returncode == 0
    return Leftovers(sorted(pids), netns, bridge)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _kill_all(state_dir: Path, spare: int | None = None) -> Leftovers:
    """SIGKILL every process of the stack, again until none is found: a process may fork between a scan and
    the kill (vLLM starting its engine). The namespaces are deleted only after, while they still name them."""
    first = find_leftovers(state_dir)
    killed: set[int] = set()
    left = first
    for _ in range(10):
        pids = [p for p in left.processes if p != spare]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        _wait_gone(pids, 10)
        left = find_leftovers(state_dir)
    return Leftovers(sorted(killed), left.netns or first.netns, left.bridge or first.bridge)


def _remove(state_dir: Path, spare: int | None = None) -> Leftovers:
    left = _kill_all(state_dir, spare)
    for name in left.netns:
        _ip("netns", "del", name)
    if left.bridge:
        _ip("link", "del", bridge_name(state_dir))
    return left


def clear(state_dir: Path, grace: float = 60.0) -> Leftovers:
    """Stop the stack of `state_dir` and anything it left; returns what had to be killed after the grace.
    The supervisor gets SIGTERM and `grace` seconds to stop its pieces in order; the rest gets SIGKILL."""
    state = State.read(state_dir)
    marked = _marked_processes(marker(state_dir))
    if state is not None and state.pid in marked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGTERM)
        _wait_gone([state.pid], grace)
    left = _remove(state_dir)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return left


# -- the supervisor ---------------------------------------------------------------------------------------
class Stopped(Exception):
    """A stop signal arrived."""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def serve(state_dir: Path, router_port: int, vllm_python: str) -> int:
    """Run the stack until a signal; then stop every piece, newest first, and clear what is left."""
    from loraserve.local.cluster import LocalCluster

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(state_dir / "cluster")
    children: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, *argv: str, env: dict[str, str] | None = None) -> None:
        with open(logs / f"{name}.log", "ab") as out:
            children[name] = subprocess.Popen(
                [sys.executable, *argv],
                env={**(env or cluster.env()), "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    router = f"http://127.0.0.1:{router_port}"
    try:
        cluster.start()
        cluster.kubectl("apply", "--server-side", "-f", str(REPO_CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO_CRDS))
        # One node that really runs its pods. Untainted and carrying the default accelerator, so a Deployment
        # written from the README alone (no tolerations, no region) lands on it as on any GPU cluster.
        spawn(
            "nodeagent",
            "-m",
            "loraserve.local.nodeagent",
            f"--kubeconfig={cluster.kubeconfig}",
            "--pool=run",
            "--untainted",
            f"--bridge={bridge_name(state_dir)}",
            f"--run-dir={state_dir / 'pods'}",
            f"--vllm-python={vllm_python}",
            f"--node={NODE}=NVIDIA_A100_80GB:8:{NODE_REGION}",
            # Pod addresses of their own, so that two stacks (or a test cluster) on one host do not collide.
            f"--cidr-base={200 + int(marker(state_dir), 16) % 50}",
        )
        spawn(
            "router",
            "-m",
            "loraserve.router",
            "--host=127.0.0.1",
            f"--port={router_port}",
            f"--kubeconfig={cluster.kubeconfig}",
        )
        spawn(
            "operator",
            "-m",
            "loraserve.cli.main",
            "operator",
            "--standalone",
            env={**cluster.env(), "LORASERVE_ROUTER_LOAD_URLS": f"{router}/load"},
        )
        deadline = time.monotonic() + 120
        while not _healthy(f"{router}/health"):
            _check(children, logs)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not answer at {router}/health: see {logs / 'router.log'}")
            time.sleep(0.5)
        state = State(os.getpid(), str(cluster.kubeconfig), router, str(cluster.bin_dir))
        (state_dir / STATE_FILE).write_text(json.dumps(asdict(state)))
        print(f"ready: KUBECONFIG={cluster.kubeconfig} router={router}", flush=True)
        while True:
            _check(children, logs)
            time.sleep(1)
    except Stopped as exc:
        print(f"stopping ({exc})", flush=True)
        return 0
    except Exception as exc:
        print(f"error: {exc}", flush=True)
        return 1
    finally:
        # Ignore further signals while stopping: a second Ctrl-C must not leave half of the stack running.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        for proc in reversed(children.values()):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(children.values()):
            try:
                proc.wait(60)  # the node agent stops its pods (vLLM) and deletes their namespaces first
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster.stop()
        _clear_own(state_dir)


def _clear_own(state_dir: Path) -> None:
    """What the pieces did not stop themselves (a pod process that ignored SIGTERM): killed, deleted."""
    _remove(state_dir, spare=os.getpid())


def _check(children: dict[str, subprocess.Popen[bytes]], logs: Path) -> None:
    for name, proc in children.items():
        if proc.poll() is not None:
            tail = (logs / f"{name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.local.stack", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--router-port", type=int, default=8080)
    parser.add_argument("--vllm-python", required=True)
    args = parser.parse_args(argv)
    state_dir = args.dir.resolve()
    if os.environ.get(MARKER_ENV) != marker(state_dir):
        # Without the marker in its own environment the supervisor could not be found after a SIGKILL.
        os.environ[MARKER_ENV] = marker(state_dir)
        os.execv(sys.executable, [sys.executable, "-m", "loraserve.local.stack", *(argv or sys.argv[1:])])
    return serve(state_dir, args.router_port, args.vllm_python)


if __name__ == "__main__":
    raise SystemExit(main())
