"""The fetcher against crafted sources: listings and archives that try to write outside the artifact's folder,
redirects to loopback, metadata and plain http, sizes that lie, a slow source beside a fast one, and error
text that must not carry the remote server's words. Real TLS servers on loopback (trustme certificates),
the sidecar's real HTTP app, and the operator's real fetch call."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import ssl
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from loraserve import addons, fetcher
from loraserve.fetcher import _app, fetch
from loraserve.fetchpolicy import (
    FetchPolicy,
    SourceRefused,
    SourceUnavailable,
    TooLarge,
    UnsafePath,
    address_refusal,
    confine,
    redact,
)

HOST = "127.0.0.2"  # the "private registry" the tests allow; 127.0.0.1 stays refused as loopback
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def policy(ca: trustme.CA, tmp_path: Path) -> FetchPolicy:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return FetchPolicy(allow_networks=(ipaddress.ip_network(f"{HOST}/32"),), ca_file=str(bundle))


@dataclass
class TlsSite:
    """An HTTPS server on `host` whose routes the test sets; it records every path it was asked for."""

    ca: trustme.CA
    host: str = HOST
    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> TlsSite:
        async def dispatch(request: web.Request) -> web.StreamResponse:
            self.seen.append(request.path)
            handler = self.routes.get(request.path)
            return await handler(request) if handler else web.Response(status=404, text="not here")

        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", dispatch)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(HOST, "127.0.0.1").configure_cert(context)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://{self.host}:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def site(ca: trustme.CA) -> AsyncIterator[TlsSite]:
    s = await TlsSite(ca).start()
    yield s
    await s.stop()


@pytest.fixture
async def loopback_site(ca: trustme.CA) -> AsyncIterator[TlsSite]:
    s = await TlsSite(ca, host="127.0.0.1").start()
    yield s
    await s.stop()


def body(data: bytes) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=data)

    return handler


def redirect(location: str) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        raise web.HTTPFound(location)

    return handler


def tar_bytes(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in members:
            content = (data or {}).get(member.name)
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def regular(name: str, content: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, content


async def fetch_async(uri: str, dest: Path, policy: FetchPolicy, digest: str | None = None) -> Path:
    # fetch is blocking (it runs in a thread in the sidecar); the TLS servers run on this loop.
    return await asyncio.to_thread(fetch, uri, dest, digest, policy)


def left_behind(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# -- https: schemes, addresses, redirects ---------------------------------------------------------------
async def test_https_file_and_archive_arrive(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    info, content = regular("adapter/adapter_config.json", b'{"r": 8}')
    site.routes["/a.tar.gz"] = body(tar_bytes([info], {info.name: content}))
    site.routes["/weights.bin"] = body(b"w" * 100)
    await fetch_async(f"{site.url}/a.tar.gz", tmp_path / "a", policy)
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").read_bytes() == b'{"r": 8}'
    await fetch_async(f"{site.url}/weights.bin", tmp_path / "w", policy)
    assert (tmp_path / "w" / "weights.bin").read_bytes() == b"w" * 100


async def test_plain_http_is_refused(policy: FetchPolicy, tmp_path: Path) -> None:
    with pytest.raises(SourceRefused, match="only https"):
        await fetch_async(f"http://{HOST}:1/x.tar", tmp_path / "x", policy)
    assert not (tmp_path / "x").exists()


async def test_redirect_to_plain_http_is_refused(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    site.routes["/x"] = redirect(f"http://{HOST}:1/x")
    with pytest.raises(SourceRefused, match="only https"):
        await fetch_async(f"{site.url}/x", tmp_path / "x", policy)


async def test_redirect_to_metadata_is_refused_even_when_allow_listed(
    site: TlsSite, policy: FetchPolicy, tmp_path: Path
) -> None:
    site.routes["/x"] = redirect("https://169.254.169.254/latest/meta-data/iam/security-credentials/")
    with pytest.raises(SourceRefused, match="metadata"):
        await fetch_async(f"{site.url}/x", tmp_path / "x", policy)
    generous = FetchPolicy(
        allow_networks=(ipaddress.ip_network("0.0.0.0/0"),), allow_hosts=frozenset({"169.254.169.254"})
    )
    with pytest.raises(SourceRefused, match="metadata"):
        await fetch_async("https://169.254.169.254/latest/meta-data/", tmp_path / "y", generous)


async def test_redirect_to_loopback_is_refused(
    site: TlsSite, loopback_site: TlsSite, policy: FetchPolicy, tmp_path: Path
) -> None:
    loopback_site.routes["/secret"] = body(b"internal")
    site.routes["/x"] = redirect(f"{loopback_site.url}/secret")
    site.routes["/y"] = redirect("/z")  # a redirect that stays allowed is followed
    site.routes["/z"] = body(b"fine")
    with pytest.raises(SourceRefused, match="loopback"):
        await fetch_async(f"{site.url}/x", tmp_path / "x", policy)
    assert loopback_site.seen == []  # refused before connecting, not after reading
    await fetch_async(f"{site.url}/y", tmp_path / "y", policy)
    assert (tmp_path / "y" / "y").read_bytes() == b"fine"


async def test_private_registry_needs_the_allow_list(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    site.routes["/x"] = body(b"data")
    closed = FetchPolicy(ca_file=policy.ca_file)
    with pytest.raises(SourceRefused, match="allow-list"):
        await fetch_async(f"{site.url}/x", tmp_path / "x", closed)
    assert site.seen == []
    by_host = FetchPolicy(ca_file=policy.ca_file, allow_hosts=frozenset({HOST}))
    await fetch_async(f"{site.url}/x", tmp_path / "x", by_host)
    assert (tmp_path / "x" / "x").read_bytes() == b"data"


async def test_redirect_loops_end(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    site.routes["/loop"] = redirect("/loop")
    with pytest.raises(SourceRefused, match="redirects"):
        await fetch_async(f"{site.url}/loop", tmp_path / "x", policy)


def test_address_rules() -> None:
    open_policy = FetchPolicy()
    assert address_refusal("h", ipaddress.ip_address("93.184.216.34"), open_policy) is None
    for private in ("10.1.2.3", "192.168.0.1", "172.16.0.1", "100.64.0.1", "fd00::1", "::1", "127.0.0.1"):
        assert address_refusal("h", ipaddress.ip_address(private), open_policy) is not None, private
    mapped = ipaddress.ip_address("::ffff:169.254.169.254")
    assert "metadata" in (address_refusal("h", mapped, open_policy) or "")
    allowed = FetchPolicy(allow_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    assert address_refusal("h", ipaddress.ip_address("10.1.2.3"), allowed) is None
    assert address_refusal("h", ipaddress.ip_address("192.168.0.1"), allowed) is not None


def test_settings_from_the_environment_name_the_bad_field() -> None:
    policy = FetchPolicy.from_env(
        {
            "LORASERVE_FETCH_MAX_FILE_BYTES": "1000",
            "LORASERVE_FETCH_ALLOW_NETWORKS": "10.0.0.0/8, fd00::/8",
            "LORASERVE_FETCH_ALLOW_HOSTS": "Registry.Internal",
        }
    )
    assert policy.max_file_bytes == 1000
    assert policy.allow_hosts == frozenset({"registry.internal"})
    assert len(policy.allow_networks) == 2
    with pytest.raises(ValueError, match="LORASERVE_FETCH_ALLOW_NETWORKS"):
        FetchPolicy.from_env({"LORASERVE_FETCH_ALLOW_NETWORKS": "ten"})
    with pytest.raises(ValueError, match="LORASERVE_FETCH_MAX_ARTIFACT_BYTES"):
        FetchPolicy.from_env({"LORASERVE_FETCH_MAX_ARTIFACT_BYTES": "-1"})


# -- sizes ----------------------------------------------------------------------------------------------
async def test_size_limits_hold_whether_declared_or_not(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    small = FetchPolicy(max_file_bytes=1000, allow_networks=policy.allow_networks, ca_file=policy.ca_file)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: the limit holds while streaming
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"x" * 500)
        await response.write_eof()
        return response

    site.routes["/declared"] = body(b"x" * 5000)
    site.routes["/chunked"] = chunked
    for path in ("/declared", "/chunked"):
        with pytest.raises(TooLarge, match="limit per file"):
            await fetch_async(site.url + path, tmp_path / "x", small)
        assert left_behind(tmp_path) == ["ca.pem"]  # nothing half-written stays
    info, content = regular("big.bin", b"y" * 800)
    two = tar_bytes([info, regular("big2.bin", content)[0]], {"big.bin": content, "big2.bin": content})
    site.routes["/two.tar.gz"] = body(two)
    per_artifact = FetchPolicy(max_artifact_bytes=1000, allow_networks=policy.allow_networks, ca_file=policy.ca_file)
    with pytest.raises(TooLarge, match="limit per artifact"):
        await fetch_async(f"{site.url}/two.tar.gz", tmp_path / "x", per_artifact)


# -- archives -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "member",
    [
        regular("../escaped.txt", b"x")[0],
        regular("/tmp/absolute.txt", b"x")[0],
        regular("ok/../../escaped.txt", b"x")[0],
    ],
    ids=["dotdot", "absolute", "nested-dotdot"],
)
async def test_archive_paths_stay_inside(
    member: tarfile.TarInfo, site: TlsSite, policy: FetchPolicy, tmp_path: Path
) -> None:
    site.routes["/evil.tar.gz"] = body(tar_bytes([member], {member.name: b"x"}))
    dest = tmp_path / "models" / "a"
    with pytest.raises(UnsafePath, match="leave the artifact's folder"):
        await fetch_async(f"{site.url}/evil.tar.gz", dest, policy)
    assert not (tmp_path / "models" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert left_behind(tmp_path / "models") == []


async def test_archive_links_are_refused(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    link = tarfile.TarInfo("adapter_config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("weights.bin")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../../secret"
    for name, member in (("sym", link), ("hard", hard)):
        site.routes[f"/{name}.tar.gz"] = body(tar_bytes([member]))
        with pytest.raises(UnsafePath, match="link or device"):
            await fetch_async(f"{site.url}/{name}.tar.gz", tmp_path / name, policy)
        assert not (tmp_path / name).exists()


# -- listings: S3 and Hugging Face ------------------------------------------------------------------------
@dataclass
class FakeS3:
    """boto3's S3 client as the fetcher uses it: a listing the test crafts, bodies that may outgrow it."""

    objects: dict[str, bytes]
    sizes: dict[str, int] = field(default_factory=dict)
    got: list[str] = field(default_factory=list)

    def get_paginator(self, _: str) -> FakeS3:
        return self

    def paginate(self, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:
        contents = [
            {"Key": k, "Size": self.sizes.get(k, len(v))} for k, v in self.objects.items() if k.startswith(Prefix)
        ]
        yield {"Contents": contents}

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self.got.append(Key)
        return {"Body": io.BytesIO(self.objects[Key])}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> FakeS3:
    fake = FakeS3({})
    monkeypatch.setattr(fetcher, "_s3_client", lambda policy, what: fake)
    return fake


@pytest.mark.parametrize("evil", ["adapters/bot/../../../escaped.txt", "adapters/bot/sub/../../../escaped.txt"])
def test_s3_listing_cannot_write_outside(evil: str, s3: FakeS3, tmp_path: Path) -> None:
    s3.objects = {"adapters/bot/adapter_config.json": b"{}", evil: b"pwned"}
    dest = tmp_path / "adapters" / "bot"
    with pytest.raises(UnsafePath, match="S3 key"):
        fetch("s3://bucket/adapters/bot", dest, policy=FetchPolicy())
    assert s3.got == []  # the whole listing is checked before the first byte is written
    assert not list(tmp_path.rglob("escaped.txt"))
    assert left_behind(tmp_path / "adapters") == []


def test_s3_prefix_is_a_folder_and_sizes_are_enforced(s3: FakeS3, tmp_path: Path) -> None:
    s3.objects = {
        "adapters/bot/adapter_config.json": b"{}",
        "adapters/bot/": b"",  # a folder marker
        "adapters/bot-evil/adapter_config.json": b"not ours",
    }
    fetch("s3://bucket/adapters/bot", tmp_path / "bot", policy=FetchPolicy())
    assert sorted(p.name for p in (tmp_path / "bot").rglob("*")) == ["adapter_config.json"]
    assert (tmp_path / "bot" / "adapter_config.json").read_bytes() == b"{}"

    s3.got.clear()
    s3.sizes = {"adapters/bot/adapter_config.json": 5000}  # the listing says too big: nothing is fetched
    with pytest.raises(TooLarge):
        fetch("s3://bucket/adapters/bot", tmp_path / "big", policy=FetchPolicy(max_file_bytes=1000))
    assert s3.got == []
    s3.sizes = {"adapters/bot/adapter_config.json": 2}  # the listing lies: the bytes are counted anyway
    s3.objects["adapters/bot/adapter_config.json"] = b"z" * 5000
    with pytest.raises(TooLarge):
        fetch("s3://bucket/adapters/bot", tmp_path / "big", policy=FetchPolicy(max_file_bytes=1000))
    assert not (tmp_path / "big").exists()


@dataclass
class FakeHub:
    files: list[tuple[str, int]]
    downloaded: list[str] = field(default_factory=list)

    def model_info(self, repo: str, revision: str | None, files_metadata: bool) -> Any:
        siblings = [SimpleNamespace(rfilename=n, size=s) for n, s in self.files]
        return SimpleNamespace(sha="0" * 40, siblings=siblings)

    def hf_hub_download(self, repo_id: str, filename: str, revision: str, local_dir: str) -> str:
        self.downloaded.append(filename)
        path = Path(local_dir, filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return str(path)


def test_hf_listing_cannot_write_outside(tmp_path: Path) -> None:
    hub = FakeHub([("config.json", 1), ("../../escaped.txt", 1)])
    with pytest.raises(UnsafePath, match="Hugging Face file"):
        fetcher.download_hf("org/model", "main", tmp_path / "m", FetchPolicy(), hub)
    assert hub.downloaded == []
    big = FakeHub([("model.safetensors", 5000)])
    with pytest.raises(TooLarge):
        fetcher.download_hf("org/m", None, tmp_path / "b", FetchPolicy(max_file_bytes=10), big)
    assert big.downloaded == []
    good = FakeHub([("config.json", 1), ("sub/model.safetensors", 1)])
    commit = fetcher.download_hf("org/m", "v1", tmp_path / "g", FetchPolicy(), good)
    assert commit == "0" * 40
    assert (tmp_path / "g" / "sub" / "model.safetensors").exists()


# -- local sources ----------------------------------------------------------------------------------------
def test_pvc_paths_stay_in_their_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_PVC_ROOT", str(tmp_path / "pvc"))
    (tmp_path / "pvc" / "claim" / "bot").mkdir(parents=True)
    (tmp_path / "pvc" / "claim" / "bot" / "adapter_config.json").write_text("{}")
    (tmp_path / "pvc" / "other").mkdir()
    (tmp_path / "pvc" / "other" / "secret.txt").write_text("other team")
    (tmp_path / "pvc" / "claim" / "link").symlink_to(tmp_path / "pvc" / "other")
    fetch("pvc://claim/bot", tmp_path / "ok", policy=FetchPolicy())
    assert (tmp_path / "ok" / "adapter_config.json").read_text() == "{}"
    with pytest.raises(UnsafePath):
        fetch("pvc://claim/../other", tmp_path / "x", policy=FetchPolicy())
    with pytest.raises(UnsafePath):
        fetch("pvc://claim/link", tmp_path / "x", policy=FetchPolicy())
    assert not (tmp_path / "x").exists()


def test_local_sources_never_read_the_pods_secrets(tmp_path: Path) -> None:
    with pytest.raises(SourceRefused, match="/proc"):
        fetch("file:///proc/self/environ", tmp_path / "x", policy=FetchPolicy())
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "environ").symlink_to("/proc/self/environ")
    with pytest.raises(SourceRefused, match="/proc"):
        fetch(f"file://{folder}", tmp_path / "x", policy=FetchPolicy())
    roots = FetchPolicy(file_roots=(str(tmp_path / "models"),))
    with pytest.raises(SourceRefused, match="LORASERVE_FETCH_FILE_ROOTS"):
        fetch(f"file://{folder}", tmp_path / "x", policy=roots)
    assert not (tmp_path / "x").exists()


def test_confine_and_redact() -> None:
    assert str(confine("a/./b")) == "a/b"
    for bad in ("", ".", "..", "/etc/passwd", "a/../../b", "a\\..\\b", "a\x00b"):
        with pytest.raises(UnsafePath):
            confine(bad)
    shown = redact("https://user:pw@host.example:8443/a/b.tar?X-Amz-Signature=abc#frag")
    assert shown == "https://host.example:8443/a/b.tar"


# -- the sidecar: per-artifact locks, error text ----------------------------------------------------------
async def test_a_slow_source_blocks_no_other_artifact(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(body=b"slow")

    site.routes["/slow.bin"] = slow
    site.routes["/fast.bin"] = body(b"fast")
    async with TestClient(TestServer(_app(tmp_path / "adapters", policy=policy))) as client:
        first = asyncio.create_task(client.post("/fetch", json={"name": "a", "uri": f"{site.url}/slow.bin"}))
        await asyncio.wait_for(entered.wait(), 30)
        fast = await client.post("/fetch", json={"name": "b", "uri": f"{site.url}/fast.bin"})
        assert fast.status == 200, await fast.text()
        assert (tmp_path / "adapters" / "b" / "fast.bin").read_bytes() == b"fast"
        assert not first.done()  # still waiting on its own source
        release.set()
        slow_answer = await asyncio.wait_for(first, 30)
        assert slow_answer.status == 200
        assert (tmp_path / "adapters" / "a" / "slow.bin").read_bytes() == b"slow"


async def test_errors_name_the_artifact_and_class_never_the_remote_body(
    site: TlsSite, policy: FetchPolicy, tmp_path: Path
) -> None:
    async def denied(_: web.Request) -> web.Response:
        return web.Response(status=403, text="<Error>internal bucket layout: team-x/secret-key-id=AKIA...</Error>")

    site.routes["/a.tar"] = denied
    uri = f"{site.url.replace('https://', 'https://user:hunter2@')}/a.tar?X-Amz-Signature=deadbeef"
    async with TestClient(TestServer(_app(tmp_path / "adapters", token="t", policy=policy))) as client:
        # The operator's own call, through the sidecar, as a replica plan step would make it.
        replica = addons.Replica("pod-0", "127.0.0.1", frozenset())
        step = addons.ReplicaPlan(replica, load=[addons.Artifact("bot-v1", uri, None)])
        from loraserve.handlers.addon import _load

        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as session:
            failures = await _load(session, {}, step, client.port or 0, ("ns", "dep", "bot"))
    assert len(failures) == 1
    refusal = failures[0]
    assert refusal.reason == "AdapterSourceUnavailable"
    assert refusal.message.startswith("bot-v1 on pod-0: ")
    assert f"{site.url}/a.tar: HTTP 403" in refusal.message
    for secret in ("internal bucket", "AKIA", "hunter2", "deadbeef", "<Error>"):
        assert secret not in refusal.message


async def test_a_fetcher_answer_that_is_not_ours_stays_out_of_status(tmp_path: Path) -> None:
    async def crash_page(_: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>upstream proxy 10.0.0.7 says: token=abc</html>")

    app = web.Application()
    app.router.add_post("/fetch", crash_page)
    async with TestClient(TestServer(app)) as client, aiohttp.ClientSession() as session:
        step = addons.ReplicaPlan(addons.Replica("pod-0", "127.0.0.1", frozenset()), [addons.Artifact("x", "u", None)])
        from loraserve.handlers.addon import _load

        failures = await _load(session, {}, step, client.port or 0, ("ns", "dep", "x"))
    assert [(f.reason, f.message) for f in failures] == [
        ("AdapterFetchFailed", "x on pod-0: the fetcher answered HTTP 502")
    ]


async def test_source_unavailable_is_502_and_unsafe_is_422(site: TlsSite, policy: FetchPolicy, tmp_path: Path) -> None:
    site.routes["/evil.tar.gz"] = body(tar_bytes([regular("../x", b"x")[0]], {"../x": b"x"}))
    async with TestClient(TestServer(_app(tmp_path / "adapters", policy=policy))) as client:
        gone = await client.post("/fetch", json={"name": "a", "uri": f"{site.url}/missing.bin"})
        assert gone.status == 502
        assert (await gone.json())["reason"] == SourceUnavailable.reason
        evil = await client.post("/fetch", json={"name": "b", "uri": f"{site.url}/evil.tar.gz"})
        assert evil.status == 422
        assert (await evil.json())["reason"] == UnsafePath.reason
    assert left_behind(tmp_path / "adapters") == []


def test_s3_errors_keep_the_code_not_the_message(s3: FakeS3, tmp_path: Path) -> None:
    class ClientError(Exception):  # botocore's shape: the server's words in the message, a code beside them
        def __init__(self, code: str) -> None:
            super().__init__(f"An error occurred ({code}): bucket team-x-secret-layout is not yours")
            self.response = {"Error": {"Code": code, "Message": "bucket team-x-secret-layout is not yours"}}

    def denied(Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:
        raise ClientError("AccessDenied")

    s3.paginate = denied  # type: ignore[method-assign]
    with pytest.raises(SourceUnavailable) as caught:
        fetch("s3://bucket/adapters/bot", tmp_path / "x", policy=FetchPolicy())
    assert str(caught.value) == "s3://bucket/adapters/bot: AccessDenied"
    s3.paginate = lambda Bucket, Prefix: iter([{"Contents": []}])  # type: ignore[method-assign]
    with pytest.raises(SourceUnavailable, match="no objects"):
        fetch("s3://bucket/adapters/bot", tmp_path / "x", policy=FetchPolicy())
