"""Brings model and adapter artifacts onto a replica, and checks them against their pinned digest.

    loraserve-fetch fetch --uri URI --dest DIR [--digest sha256:...]     # one artifact (init step)
    loraserve-fetch serve --dir DIR --port 8001                          # sidecar beside vLLM

The sidecar answers `POST /fetch {"name", "uri", "digest"}` with `{"path"}` once the files are in
DIR/<name> and match the digest (422 `AdapterDigestMismatch` otherwise, and nothing is left behind), and
`DELETE /adapters/<name>` after an unload. The operator calls it before vLLM's /v1/load_lora_adapter, so
vLLM only ever reads complete, verified files.

Sources: file:///path (or a plain path), https://... (a .tar/.tar.gz/.tgz archive or a single file),
pvc://claim/path (the claim mounted at $LORASERVE_PVC_ROOT/claim, default /mnt/pvc), hf://org/name[@revision]
(needs huggingface_hub; HF_TOKEN from the environment), s3://bucket/prefix (needs boto3; AWS_* from the
environment). Credentials are read from the environment only and never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraserve.digest import directory_digest

# The Deployment's model-server token (from its Secret); when set, every request but /health must bear it.
TOKEN_ENV = "LORASERVE_MODEL_SERVER_TOKEN"
NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789-._")


class FetchError(Exception):
    reason = "AdapterFetchFailed"


class DigestMismatch(FetchError):
    reason = "AdapterDigestMismatch"


def _download_to(uri: str, target: Path) -> None:
    parsed = urlparse(uri)
    scheme = parsed.scheme
    if scheme in ("", "file"):
        source = Path(parsed.path if scheme else uri)
        if not source.exists():
            raise FetchError(f"{uri}: no such file or directory")
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.mkdir(parents=True)
            shutil.copy2(source, target / source.name)
    elif scheme == "pvc":
        root = Path(os.environ.get("LORASERVE_PVC_ROOT", "/mnt/pvc"))
        _download_to(str(root / parsed.netloc / parsed.path.lstrip("/")), target)
    elif scheme == "https" or scheme == "http":
        target.mkdir(parents=True)
        name = Path(parsed.path).name or "artifact"
        archive = target.parent / f".{target.name}.download"
        try:
            with urllib.request.urlopen(uri, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise FetchError(f"{uri}: {exc}") from None
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(target, filter="data")
            archive.unlink()
        else:
            archive.rename(target / name)
    elif scheme == "hf":
        try:
            from huggingface_hub import snapshot_download  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise FetchError("hf:// sources need the huggingface_hub package in the fetcher image") from None
        repo, _, revision = (parsed.netloc + parsed.path).partition("@")
        snapshot_download(repo_id=repo, revision=revision or None, local_dir=str(target))
    elif scheme == "s3":
        try:
            import boto3  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise FetchError("s3:// sources need the boto3 package in the fetcher image") from None
        bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
        s3 = boto3.client("s3")
        target.mkdir(parents=True)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                rel = item["Key"][len(prefix) :].lstrip("/")
                if rel:
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, item["Key"], str(target / rel))
    else:
        raise FetchError(f"{uri}: unsupported scheme {scheme!r}")


def fetch(uri: str, dest: Path, digest: str | None = None) -> Path:
    """Fetch `uri` into `dest` (replacing it), verified against `digest` when given. Atomic: on any failure
    `dest` is left as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    target = staging / "files"
    try:
        _download_to(uri, target)
        if digest is not None:
            actual = directory_digest(target)
            if actual != digest:
                raise DigestMismatch(f"{uri}: digest {actual} does not match the pinned {digest}")
        if dest.exists():
            shutil.rmtree(dest)
        target.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _app(root: Path, token: str | None = None) -> Any:
    from aiohttp import web

    lock = asyncio.Lock()
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

    async def do_fetch(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            name, uri, digest = str(body["name"]), str(body["uri"]), body.get("digest")
        except (ValueError, KeyError, TypeError):
            return web.json_response({"reason": "BadRequest", "message": "need JSON {name, uri, digest?}"}, status=400)
        if not name or set(name) - NAME_OK or name.startswith("."):
            return web.json_response({"reason": "BadRequest", "message": f"bad adapter name {name!r}"}, status=400)
        dest = root / name
        async with lock:  # one download at a time: the disk and network are the limit anyway
            if dest.exists() and digest and directory_digest(dest) == digest:
                return web.json_response({"path": str(dest), "cached": True})
            try:
                await asyncio.to_thread(fetch, uri, dest, digest)
            except DigestMismatch as exc:
                return web.json_response({"reason": exc.reason, "message": str(exc)}, status=422)
            except FetchError as exc:
                return web.json_response({"reason": exc.reason, "message": str(exc)}, status=502)
        return web.json_response({"path": str(dest), "cached": False})

    async def remove(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if set(name) - NAME_OK or name.startswith("."):
            return web.json_response({"reason": "BadRequest", "message": "bad adapter name"}, status=400)
        shutil.rmtree(root / name, ignore_errors=True)
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
    merge_cmd = sub.add_parser("merge", help="fetch an adapter and merge it into base weights (live merge)")
    merge_cmd.add_argument("--base", required=True, type=Path)
    merge_cmd.add_argument("--adapter-uri", required=True)
    merge_cmd.add_argument("--digest")
    merge_cmd.add_argument("--base-digest", help="the base's pinned sha256 digest (ModelVersion baseModel.revision)")
    merge_cmd.add_argument("--out", required=True, type=Path)
    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("--dir", required=True, type=Path)
    serve.add_argument("--port", type=int, default=8001)
    serve.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            fetch(args.uri, args.dest, args.digest)
        except FetchError as exc:
            print(f"{exc.reason}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "merge":
        from loraserve.merge import merge

        with tempfile.TemporaryDirectory() as scratch:
            try:
                adapter = fetch(args.adapter_uri, Path(scratch) / "adapter", args.digest)
                merged = merge(args.base, adapter, args.out, base_digest=args.base_digest)
            except (FetchError, ValueError) as exc:
                print(f"MergeFailed: {exc}", file=sys.stderr)
                return 1
        print(f"merged {len(merged)} weights into {args.out}")
        return 0
    from aiohttp import web

    args.dir.mkdir(parents=True, exist_ok=True)
    token = os.environ.get(TOKEN_ENV) or None
    web.run_app(_app(args.dir, token), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
