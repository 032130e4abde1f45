"""Brings model and adapter artifacts onto a replica, and checks them against their pinned digest.

    loraserve-fetch fetch --uri URI --dest DIR [--digest sha256:...]     # one artifact (init step)
    loraserve-fetch serve --dir DIR --port 8001                          # sidecar beside vLLM

The sidecar answers `POST /fetch {"name", "uri", "digest"}` with `{"path"}` once the files are in
DIR/<name> and match the digest (422 `AdapterDigestMismatch` otherwise, and nothing is left behind), and
`DELETE /adapters/<name>` after an unload. The operator calls it before vLLM's /v1/load_lora_adapter, so
vLLM only ever reads complete, verified files. Each artifact has its own lock (a second request for the same
name waits for the first); different artifacts are fetched side by side, so one slow source blocks no other.

Sources: file:///path (or a plain path), https://... (a .tar/.tar.gz/.tgz archive or a single file),
pvc://claim/path (the claim mounted at $LORASERVE_PVC_ROOT/claim, default /mnt/pvc), hf://org/name[@revision]
(needs huggingface_hub; HF_TOKEN from the environment), s3://bucket/prefix (needs boto3; AWS_* from the
environment). Credentials are read from the environment only and never logged.

What may be fetched and written is decided in loraserve.fetchpolicy (https only, no private, loopback or
metadata addresses unless allow-listed, every listed or archived path inside the artifact's folder, size
limits); settings from the environment: LORASERVE_FETCH_MAX_FILE_BYTES, LORASERVE_FETCH_MAX_ARTIFACT_BYTES,
LORASERVE_FETCH_ALLOW_HOSTS, LORASERVE_FETCH_ALLOW_NETWORKS (comma-separated), LORASERVE_FETCH_FILE_ROOTS,
LORASERVE_FETCH_CA_FILE (a private registry's CA bundle).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import http.client
import ipaddress
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from loraserve.digest import directory_digest
from loraserve.fetchpolicy import (
    MAX_REDIRECTS,
    Budget,
    DigestMismatch,
    FetchError,
    FetchPolicy,
    SourceRefused,
    SourceUnavailable,
    TooLarge,
    UnsafePath,
    address_refusal,
    check_local_path,
    check_remote,
    confine,
    follow_redirect,
    redact,
)

__all__ = ["DigestMismatch", "FetchError", "FetchPolicy", "SourceRefused", "TooLarge", "UnsafePath", "fetch"]

log = logging.getLogger("loraserve.fetcher")
# The Deployment's model-server token (from its Secret); when set, every request but /health must bear it.
TOKEN_ENV = "LORASERVE_MODEL_SERVER_TOKEN"
NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-._")
CHUNK = 1 << 20
# Adapters fetched side by side by one sidecar; more only shares the same disk and link.
PARALLEL_FETCHES = 4
_S3_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9.]{0,63}$")


# -- writing under a budget ------------------------------------------------------------------------------
def _write_stream(source: IO[bytes], path: Path, name: str, budget: Budget) -> None:
    """Copy `source` to `path`, counting every chunk against the budget (the declared size may lie)."""
    written = 0
    with open(path, "xb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            budget.add(name, written, len(chunk))
            out.write(chunk)


def _place(target: Path, rel: PurePosixPath) -> Path:
    """The file for `rel` (already confined) under `target`, its folders made; never through a link."""
    path = target.joinpath(*rel.parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.resolve() != target.resolve().joinpath(*rel.parts[:-1]):
        raise UnsafePath(f"{rel} would leave the artifact's folder")
    return path


# -- file://, plain paths and pvc:// ---------------------------------------------------------------------
def _copy_local(source: Path, target: Path, budget: Budget, policy: FetchPolicy, within: Path | None) -> None:
    """Copy a file or folder. Links are followed only where the source itself could have named (inside the
    claim for pvc://, outside the pod's secrets and pseudo-filesystems for file://); no devices or pipes."""

    def allowed(path: Path) -> Path:
        real = path.resolve()
        if within is not None:
            if real != within and within not in real.parents:
                raise UnsafePath(f"{path.name}: leads outside the volume")
        else:
            check_local_path(str(real), policy)
        return real

    def copy_file(path: Path, rel: PurePosixPath) -> None:
        real = allowed(path)
        if not stat.S_ISREG(real.stat().st_mode):
            raise UnsafePath(f"{rel}: not a regular file")
        budget.new_file(str(rel))
        with open(real, "rb") as src:
            _write_stream(src, _place(target, rel), str(rel), budget)

    if not source.exists():
        raise SourceUnavailable(f"{source}: no such file or directory")
    root = allowed(source)
    target.mkdir(parents=True)
    if root.is_file():
        copy_file(source, PurePosixPath(source.name))
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                dirnames.remove(d)  # like the digest: links to folders are not descended into
        for filename in filenames:
            path = here / filename
            rel = PurePosixPath(path.relative_to(root).as_posix())
            copy_file(path, rel)


def _pvc_source(uri: str) -> tuple[Path, Path]:
    """(the path, the claim's mount) of pvc://claim/path; `..` may not climb out of the claim."""
    parts = urlsplit(uri)
    claim = parts.netloc
    if not claim or "/" in claim or claim in (".", ".."):
        raise SourceRefused(f"{uri}: pvc://<claim>/<path> needs a claim name")
    mount = Path(os.environ.get("LORASERVE_PVC_ROOT", "/mnt/pvc")) / claim
    sub = parts.path.lstrip("/")
    path = mount.joinpath(*confine(sub, "pvc path").parts) if sub else mount
    return path, mount.resolve()


# -- https:// ---------------------------------------------------------------------------------------------
def _resolve_checked(host: str, port: int, policy: FetchPolicy, what: str) -> str:
    """An address of `host` that may be reached; every address it resolves to must pass (a name that also
    resolves to a private or metadata address is refused, whichever one a connect would pick)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise SourceUnavailable(f"{what}: the host name does not resolve") from None
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        refusal = address_refusal(host, ipaddress.ip_address(address.split("%")[0]), policy)
        if refusal is not None:
            raise SourceRefused(f"{what}: {host} is {refusal}")
    return addresses[0]


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to the address that was checked (no second lookup a DNS rebind could change), and verifies
    the certificate for the host name."""

    def __init__(self, host: str, port: int, policy: FetchPolicy, what: str, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=policy.timeout, context=context)
        self._policy = policy
        self._what = what
        self._tls = context

    def connect(self) -> None:
        address = _resolve_checked(self.host, self.port, self._policy, self._what)
        sock = socket.create_connection((address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _https_get(uri: str, out: Path, policy: FetchPolicy, budget: Budget, what: str) -> None:
    """GET `uri` into `out`, following at most MAX_REDIRECTS redirects, each checked like the first."""
    context = ssl.create_default_context(cafile=policy.ca_file)
    url = uri
    for hops in range(MAX_REDIRECTS + 1):
        host, port = check_remote(url)
        parts = urlsplit(url)
        conn = _CheckedHTTPSConnection(host, port, policy, what, context)
        try:
            conn.request(
                "GET",
                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                headers={"User-Agent": "loraserve-fetch", "Accept-Encoding": "identity"},
            )
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                url = follow_redirect(url, response.getheader("Location"), hops)
                continue
            if response.status != 200:
                # The status says what class of failure it was; the body is the server's and stays there.
                raise SourceUnavailable(f"{what}: HTTP {response.status}")
            declared = response.getheader("Content-Length")
            budget.new_file(out.name, int(declared) if declared and declared.isdigit() else None)
            _write_stream(response, out, out.name, budget)
            return
        except ssl.SSLError:
            raise SourceUnavailable(f"{what}: TLS failed (certificate not trusted or handshake refused)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise SourceUnavailable(f"{what}: network error ({type(exc).__name__})") from None
        finally:
            conn.close()
    raise SourceRefused(f"{what}: more than {MAX_REDIRECTS} redirects")  # pragma: no cover (follow_redirect)


def _extract_tar(archive: Path, target: Path, budget: Budget) -> None:
    """Unpack regular files and folders only, every name inside `target`, sizes within the budget; checked
    member by member before anything is written (then tarfile's own "data" filter as a second wall)."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar:
            if member.isdir():
                if PurePosixPath(member.name).parts:
                    confine(member.name, "archive member")
                    members.append(member)
                continue
            if not member.isfile():
                raise UnsafePath(f"archive member {member.name!r} is a link or device: archives may hold files only")
            confine(member.name, "archive member")
            budget.new_file(member.name)
            budget.add(member.name, member.size, member.size)
            members.append(member)
        tar.extractall(target, members=members, filter="data")


def _download_https(uri: str, target: Path, policy: FetchPolicy, budget: Budget, what: str) -> None:
    target.mkdir(parents=True)
    name = PurePosixPath(urlsplit(uri).path).name
    if not name or name.startswith("."):
        name = "artifact"
    archive = target.parent / f".{target.name}.download"
    try:
        _https_get(uri, archive, policy, budget, what)
        if tarfile.is_tarfile(archive):
            # The download counted against the budget; the unpacked files get a fresh one.
            _extract_tar(archive, target, Budget(policy, what))
        else:
            archive.rename(target / name)
    except tarfile.TarError:
        raise SourceUnavailable(f"{what}: a damaged archive") from None
    finally:
        archive.unlink(missing_ok=True)


# -- hf:// ------------------------------------------------------------------------------------------------
def download_hf(repo: str, revision: str | None, target: Path, policy: FetchPolicy, hub: Any = None) -> str:
    """Download a Hugging Face repository at `revision` (a branch, tag or commit; default: main) into
    `target`, every listed file checked first. Returns the commit it came from, so all files are from one
    commit even if the branch moves meanwhile. `hub`: an `HfApi` (tests pass their own)."""
    what = f"hf://{repo}" + (f"@{revision}" if revision else "")
    budget = Budget(policy, what)
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        host, port = check_remote(endpoint)  # a mirror: https only, like any remote source
        _resolve_checked(host, port, policy, what)
    if hub is None:
        try:
            from huggingface_hub import HfApi  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise FetchError("hf:// sources need the huggingface_hub package in the fetcher image") from None
        hub = HfApi()
    try:
        info = hub.model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:  # huggingface_hub errors quote the server: keep the class
        raise SourceUnavailable(f"{what}: {type(exc).__name__}") from None
    files = [(s.rfilename, s.size) for s in (info.siblings or [])]
    for name, size in files:
        confine(name, "Hugging Face file")
        budget.new_file(name, size)
        budget.total += size or 0  # the whole listing must fit before anything is fetched
    budget.total = 0
    target.mkdir(parents=True)
    for name, _ in files:
        try:
            hub.hf_hub_download(repo_id=repo, filename=name, revision=info.sha, local_dir=str(target))
        except Exception as exc:  # as above
            raise SourceUnavailable(f"{what}: {name}: {type(exc).__name__}") from None
        written = target.joinpath(*PurePosixPath(name).parts)
        if written.is_symlink() or not written.resolve().is_relative_to(target.resolve()):
            raise UnsafePath(f"{what}: {name} leads outside the artifact's folder")
        size = written.stat().st_size
        budget.add(name, size, size)
    return str(info.sha)


# -- s3:// ------------------------------------------------------------------------------------------------
def _s3_error(what: str, exc: Exception) -> SourceUnavailable:
    response = getattr(exc, "response", None)  # botocore's ClientError: {"Error": {"Code": ...}}
    error = response.get("Error") if isinstance(response, dict) else None
    code = error.get("Code") if isinstance(error, dict) else None
    label = code if isinstance(code, str) and _S3_CODE.match(code) else type(exc).__name__
    return SourceUnavailable(f"{what}: {label}")


def download_s3(client: Any, bucket: str, prefix: str, target: Path, budget: Budget, what: str) -> None:
    """Download every object under `prefix` (a folder: `prefix/...`, or the one object `prefix`). The whole
    listing is checked (paths, sizes) before the first byte is written. `client`: a boto3 S3 client."""
    chosen: list[tuple[str, PurePosixPath]] = []
    try:
        pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))
    except Exception as exc:  # botocore errors quote the server: keep the code
        raise _s3_error(what, exc) from None
    for page in pages:
        for item in page.get("Contents", []):
            key = str(item["Key"])
            if key.endswith("/"):
                continue  # a folder marker
            if key == prefix:
                rel = PurePosixPath(key).name
            elif not prefix or prefix.endswith("/") or key.startswith(prefix + "/"):
                rel = key[len(prefix) :].lstrip("/")
            else:
                continue  # "adapters/bot" does not own "adapters/bot-evil/..."
            path = confine(rel, "S3 key")
            budget.new_file(rel, int(item.get("Size", 0)))
            budget.total += int(item.get("Size", 0))
            chosen.append((key, path))
    if not chosen:
        raise SourceUnavailable(f"{what}: no objects")
    budget.total, budget.files = 0, 0
    target.mkdir(parents=True)
    for key, path in chosen:
        budget.new_file(str(path))
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:
            raise _s3_error(what, exc) from None
        try:
            _write_stream(body, _place(target, path), str(path), budget)
        finally:
            body.close()


def _s3_client(policy: FetchPolicy, what: str) -> Any:
    try:
        import boto3  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise FetchError("s3:// sources need the boto3 package in the fetcher image") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        host, port = check_remote(endpoint)  # MinIO and friends: https, and allow-listed when private
        _resolve_checked(host, port, policy, what)
    return boto3.client("s3")


# -- dispatch ---------------------------------------------------------------------------------------------
def _download_to(uri: str, target: Path, policy: FetchPolicy, revision: str | None = None) -> None:
    parsed = urlsplit(uri)
    scheme = parsed.scheme
    what = redact(uri)
    budget = Budget(policy, what)
    if scheme in ("", "file"):
        _copy_local(Path(parsed.path if scheme else uri), target, budget, policy, within=None)
    elif scheme == "pvc":
        path, mount = _pvc_source(uri)
        _copy_local(path, target, budget, policy, within=mount)
    elif scheme in ("https", "http"):
        check_remote(uri)  # plain http is refused with its reason, before anything is made
        _download_https(uri, target, policy, budget, what)
    elif scheme == "hf":
        repo, _, pinned = (parsed.netloc + parsed.path).partition("@")
        download_hf(repo, revision or pinned or None, target, policy)
    elif scheme == "s3":
        download_s3(_s3_client(policy, what), parsed.netloc, parsed.path.lstrip("/"), target, budget, what)
    else:
        raise SourceRefused(f"{what}: unsupported scheme {scheme!r} (https, hf, s3, pvc, file)")


def fetch(
    uri: str, dest: Path, digest: str | None = None, policy: FetchPolicy | None = None, revision: str | None = None
) -> Path:
    """Fetch `uri` into `dest` (replacing it), verified against `digest` when given. Atomic: on any failure
    `dest` is left as it was. `revision` pins an hf:// source (over an `@revision` in the URI)."""
    policy = FetchPolicy.from_env() if policy is None else policy
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    target = staging / "files"
    try:
        try:
            _download_to(uri, target, policy, revision)
        except OSError as exc:  # our own disk: its error names no remote party
            raise FetchError(f"{redact(uri)}: {exc.strerror or type(exc).__name__}") from None
        if digest is not None:
            actual = directory_digest(target)
            if actual != digest:
                raise DigestMismatch(f"{redact(uri)}: digest {actual} does not match the pinned {digest}")
        if dest.exists():
            shutil.rmtree(dest)
        target.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# -- drain: the model server's preStop -----------------------------------------------------------------
def drain(
    metrics_url: str,
    settle: float,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Wait `settle` seconds (the router sees the pod leave its EndpointSlice and stops sending), then until
    vLLM has no request running or waiting, at most `timeout` seconds. Returns why it stopped waiting."""
    from loraserve.vllm.metrics import MetricsParseError, parse_metrics

    sleep(settle)
    deadline = clock() + timeout
    while True:
        try:
            with urllib.request.urlopen(metrics_url, timeout=5) as response:
                load = parse_metrics(response.read().decode()).load
        except (OSError, ValueError, MetricsParseError):
            return "the model server is not answering: nothing left to wait for"
        if load == 0:
            return "drained: no request running or waiting"
        if clock() >= deadline:
            return f"gave up after {timeout:.0f}s with {load} requests left"
        sleep(1.0)


# -- the sidecar ------------------------------------------------------------------------------------------
def _status_for(exc: FetchError) -> int:
    # The artifact is wrong (422: fixing the ModelVersion helps) or its source did not deliver (502).
    return 502 if isinstance(exc, SourceUnavailable) or type(exc) is FetchError else 422


class _Locks:
    """One lock per artifact name, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def _enter(self, name: str) -> asyncio.Lock:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        return lock

    def _leave(self, name: str) -> None:
        lock, users = self._locks[name]
        if users <= 1:
            del self._locks[name]
        else:
            self._locks[name] = (lock, users - 1)

    def held(self, name: str) -> _Held:
        return _Held(self, name)


class _Held:
    def __init__(self, locks: _Locks, name: str) -> None:
        self._locks, self._name = locks, name

    async def __aenter__(self) -> None:
        self._lock = self._locks._enter(self._name)
        try:
            await self._lock.acquire()
        except BaseException:
            self._locks._leave(self._name)
            raise

    async def __aexit__(self, *_: object) -> None:
        self._lock.release()
        self._locks._leave(self._name)


def _app(root: Path, token: str | None = None, policy: FetchPolicy | None = None) -> Any:
    from aiohttp import web

    policy = FetchPolicy.from_env() if policy is None else policy
    locks = _Locks()
    slots = asyncio.Semaphore(PARALLEL_FETCHES)
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
        # Only the operator holds the Deployment's token: nobody else in the cluster may fetch or delete.
        if expected is not None and request.path != "/health":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response({"reason": "Unauthorized", "message": "missing or wrong token"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def cached(dest: Path, digest: str | None) -> bool:
        return bool(digest) and dest.is_dir() and directory_digest(dest) == digest

    async def do_fetch(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            name, uri, digest = str(body["name"]), str(body["uri"]), body.get("digest")
        except (ValueError, KeyError, TypeError):
            return web.json_response({"reason": "BadRequest", "message": "need JSON {name, uri, digest?}"}, status=400)
        if not name or set(name) - NAME_OK or name.startswith("."):
            return web.json_response({"reason": "BadRequest", "message": f"bad adapter name {name!r}"}, status=400)
        if digest is not None and not isinstance(digest, str):
            return web.json_response({"reason": "BadRequest", "message": "digest must be a string"}, status=400)
        dest = root / name
        async with locks.held(name):  # the same artifact once at a time; others go on beside it
            if await asyncio.to_thread(cached, dest, digest):
                return web.json_response({"path": str(dest), "cached": True})
            try:
                async with slots:
                    await asyncio.to_thread(fetch, uri, dest, digest, policy)
            except FetchError as exc:
                log.warning("fetch of %s failed: %s: %s", name, exc.reason, exc)
                return web.json_response({"reason": exc.reason, "message": str(exc)}, status=_status_for(exc))
            except Exception:
                log.exception("fetch of %s failed", name)  # a bug of ours: the details stay in this log
                message = f"{redact(uri)}: internal error in the fetcher (see its log)"
                return web.json_response({"reason": FetchError.reason, "message": message}, status=500)
        return web.json_response({"path": str(dest), "cached": False})

    async def remove(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if set(name) - NAME_OK or name.startswith("."):
            return web.json_response({"reason": "BadRequest", "message": "bad adapter name"}, status=400)
        async with locks.held(name):
            await asyncio.to_thread(shutil.rmtree, root / name, True)
        return web.json_response({"removed": name})

    app = web.Application(client_max_size=1 << 16, middlewares=[require_token])
    app.add_routes([web.get("/health", health), web.post("/fetch", do_fetch), web.delete("/adapters/{name}", remove)])
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loraserve-fetch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("fetch", help="fetch one artifact")
    one.add_argument("--uri", required=True)
    one.add_argument("--dest", required=True, type=Path)
    one.add_argument("--digest")
    one.add_argument("--revision", help="hf:// sources: the branch, tag or commit (over an @revision in the URI)")
    merge_cmd = sub.add_parser("merge", help="fetch an adapter and merge it into base weights (live merge)")
    merge_cmd.add_argument("--base", required=True, type=Path)
    merge_cmd.add_argument("--adapter-uri", required=True)
    merge_cmd.add_argument("--digest")
    merge_cmd.add_argument("--base-digest", help="the base's pinned sha256 digest (ModelVersion baseModel.revision)")
    merge_cmd.add_argument("--out", required=True, type=Path)
    drain_cmd = sub.add_parser("drain", help="preStop: wait until the local vLLM has finished its requests")
    drain_cmd.add_argument("--port", type=int, default=8000)
    drain_cmd.add_argument("--settle", type=float, default=5.0, help="seconds for the router to stop sending")
    drain_cmd.add_argument("--timeout", type=float, default=90.0, help="longest wait for requests to finish")
    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("--dir", required=True, type=Path)
    serve.add_argument("--port", type=int, default=8001)
    serve.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    try:
        policy = FetchPolicy.from_env()
    except ValueError as exc:
        print(f"BadSettings: {exc}", file=sys.stderr)
        return 2
    if args.command == "fetch":
        try:
            fetch(args.uri, args.dest, args.digest, policy, args.revision)
        except FetchError as exc:
            print(f"{exc.reason}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "drain":
        print(drain(f"http://127.0.0.1:{args.port}/metrics", args.settle, args.timeout), file=sys.stderr)
        return 0
    if args.command == "merge":
        from loraserve.merge import merge

        with tempfile.TemporaryDirectory() as scratch:
            try:
                adapter = fetch(args.adapter_uri, Path(scratch) / "adapter", args.digest, policy)
                merged = merge(args.base, adapter, args.out, base_digest=args.base_digest)
            except (FetchError, ValueError) as exc:
                print(f"MergeFailed: {exc}", file=sys.stderr)
                return 1
        print(f"merged {len(merged)} weights into {args.out}")
        return 0
    from aiohttp import web

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args.dir.mkdir(parents=True, exist_ok=True)
    token = os.environ.get(TOKEN_ENV) or None
    web.run_app(_app(args.dir, token, policy), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
