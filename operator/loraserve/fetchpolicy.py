"""What the fetcher may fetch, and where it may write: pure rules, no I/O (the fetcher does the I/O).

The URIs come from ModelVersion and Deployment specs, which anyone allowed to create those objects writes,
and the listings and archives come from whatever server those URIs name. So:

- Every path taken from a listing (S3 keys, Hugging Face file lists) or an archive is relative, has no `..`
  component and stays inside the artifact's folder (`confine`); archives hold regular files and folders
  only, and a symbolic link in a copied folder may not point outside it.
- Remote sources are `https` only, redirects included. A host is refused when any address it resolves to is
  loopback, link-local (cloud metadata at 169.254.169.254 lives there), private, shared, multicast, reserved
  or unspecified, unless the host or network is in the allow-list (a private registry). Link-local and
  metadata addresses are refused even then.
- Sizes are bounded per file and per artifact, whatever a listing or archive header claims.
- Error messages name the artifact (its URI without credentials or query) and the class of failure, never
  what the remote server answered: they end up in CR status, which more people read than the URI's owner.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import urljoin, urlsplit, urlunsplit

GiB = 1 << 30
# Generous enough for a 405B checkpoint's shards; a disk is the real bound, these stop a server that lies.
DEFAULT_MAX_FILE_BYTES = 64 * GiB
DEFAULT_MAX_ARTIFACT_BYTES = 1024 * GiB
DEFAULT_MAX_FILES = 10_000
MAX_REDIRECTS = 5
# Pseudo-filesystems whose files are the pod's own secrets (environment, mounted tokens), never a model.
REFUSED_FILE_ROOTS = ("/proc", "/sys", "/dev", "/var/run/secrets", "/run/secrets")
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
ENV_MAX_FILE = "LORASERVE_FETCH_MAX_FILE_BYTES"
ENV_MAX_ARTIFACT = "LORASERVE_FETCH_MAX_ARTIFACT_BYTES"
ENV_ALLOW_HOSTS = "LORASERVE_FETCH_ALLOW_HOSTS"
ENV_ALLOW_NETWORKS = "LORASERVE_FETCH_ALLOW_NETWORKS"
ENV_FILE_ROOTS = "LORASERVE_FETCH_FILE_ROOTS"
ENV_CA_FILE = "LORASERVE_FETCH_CA_FILE"


class FetchError(Exception):
    """A fetch that failed; `reason` is the class of failure (the CR condition's reason)."""

    reason = "AdapterFetchFailed"


class DigestMismatch(FetchError):
    reason = "AdapterDigestMismatch"


class UnsafePath(FetchError):
    """A listing or archive named a path outside the artifact's folder (or a link or device)."""

    reason = "AdapterUnsafePath"


class SourceRefused(FetchError):
    """The URI, or a redirect, names a scheme or an address the fetcher does not reach."""

    reason = "AdapterSourceRefused"


class TooLarge(FetchError):
    reason = "AdapterTooLarge"


class SourceUnavailable(FetchError):
    """The source did not deliver (not found, denied, network); the server's own words are not kept."""

    reason = "AdapterSourceUnavailable"


def _ints(env: Mapping[str, str], key: str, default: int) -> int:
    text = env.get(key, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{key}: not an integer: {text!r}") from None
    if value < 1:
        raise ValueError(f"{key}: must be positive, got {value}")
    return value


def _items(env: Mapping[str, str], key: str) -> list[str]:
    return [item.strip() for item in env.get(key, "").split(",") if item.strip()]


@dataclass(frozen=True)
class FetchPolicy:
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_files: int = DEFAULT_MAX_FILES
    # Private registries: hosts (exact names) or networks whose private addresses may be reached.
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # file:// and plain paths: only under these folders when set (REFUSED_FILE_ROOTS are always refused).
    file_roots: tuple[str, ...] = ()
    timeout: float = 60.0
    # A private registry's CA bundle (PEM); the system's trust store otherwise.
    ca_file: str | None = field(default=None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FetchPolicy:
        env = os.environ if env is None else env
        networks = []
        for item in _items(env, ENV_ALLOW_NETWORKS):
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{ENV_ALLOW_NETWORKS}: not a network: {item!r}") from None
        return cls(
            max_file_bytes=_ints(env, ENV_MAX_FILE, DEFAULT_MAX_FILE_BYTES),
            max_artifact_bytes=_ints(env, ENV_MAX_ARTIFACT, DEFAULT_MAX_ARTIFACT_BYTES),
            allow_hosts=frozenset(h.lower() for h in _items(env, ENV_ALLOW_HOSTS)),
            allow_networks=tuple(networks),
            file_roots=tuple(_items(env, ENV_FILE_ROOTS)),
            ca_file=env.get(ENV_CA_FILE) or None,
        )


def redact(uri: str) -> str:
    """The URI as it may appear in status and logs: no user or password, no query (presigned URLs carry
    their signature there), no fragment."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if not parts.scheme:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def confine(relative: str, what: str = "path") -> PurePosixPath:
    """`relative` (from a listing or archive) as a safe relative path, or UnsafePath naming it."""
    path = PurePosixPath(relative)
    if (
        not relative
        or "\x00" in relative
        or "\\" in relative
        or path.is_absolute()
        or any(part == ".." for part in path.parts)
        or not path.parts
    ):
        raise UnsafePath(f"{what} {relative!r} would leave the artifact's folder")
    return path


def address_refusal(
    host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, policy: FetchPolicy
) -> str | None:
    """Why `address` (which `host` resolved to) may not be reached, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES or address.is_link_local:
        return "a link-local or metadata address"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "a reserved address"
    public = address.is_global
    if public:
        return None
    allowed = host.lower() in policy.allow_hosts or any(address in net for net in policy.allow_networks)
    if allowed:
        return None
    kind = "a loopback address" if address.is_loopback else "a private address"
    return f"{kind} (add the host to the fetcher's allow-list for a private registry)"


def check_remote(uri: str) -> tuple[str, int]:
    """(host, port) of an https URI, or SourceRefused: plain http is never fetched."""
    parts = urlsplit(uri)
    if parts.scheme != "https":
        raise SourceRefused(f"{redact(uri)}: only https is fetched from remote sources, not {parts.scheme or 'a path'}")
    if not parts.hostname:
        raise SourceRefused(f"{redact(uri)}: no host")
    try:
        port = parts.port or 443
    except ValueError:
        raise SourceRefused(f"{redact(uri)}: bad port") from None
    return parts.hostname, port


def follow_redirect(current: str, location: str | None, hops: int) -> str:
    """The next URL of a redirect, refused past MAX_REDIRECTS or when it leaves https."""
    if not location:
        raise SourceUnavailable(f"{redact(current)}: redirect without a location")
    if hops >= MAX_REDIRECTS:
        raise SourceRefused(f"{redact(current)}: more than {MAX_REDIRECTS} redirects")
    target = urljoin(current, location)
    check_remote(target)
    return target


def check_local_path(path: str, policy: FetchPolicy) -> None:
    """A file:// (or plain) source: never the pod's pseudo-filesystems or mounted secrets, and only under the
    configured roots when there are any. `path` must already be resolved (no `..`, no links)."""
    norm = PurePosixPath(path)
    for refused in REFUSED_FILE_ROOTS:
        if norm == PurePosixPath(refused) or PurePosixPath(refused) in norm.parents:
            raise SourceRefused(f"{path}: files under {refused} are never fetched")
    if policy.file_roots and not any(
        norm == PurePosixPath(root) or PurePosixPath(root) in norm.parents for root in policy.file_roots
    ):
        raise SourceRefused(f"{path}: not under the fetcher's allowed folders ({ENV_FILE_ROOTS})")


class Budget:
    """Bytes and files written for one artifact, checked as they are written (a header may lie)."""

    def __init__(self, policy: FetchPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.total = 0
        self.files = 0

    def new_file(self, name: str, declared: int | None = None) -> None:
        self.files += 1
        if self.files > self.policy.max_files:
            raise TooLarge(f"{self.what}: more than {self.policy.max_files} files")
        if declared is not None:
            self._check(name, declared, declared)

    def _check(self, name: str, file_bytes: int, extra: int) -> None:
        if file_bytes > self.policy.max_file_bytes:
            raise TooLarge(f"{self.what}: {name} is larger than the {self.policy.max_file_bytes}-byte limit per file")
        if self.total + extra > self.policy.max_artifact_bytes:
            raise TooLarge(f"{self.what}: larger than the {self.policy.max_artifact_bytes}-byte limit per artifact")

    def add(self, name: str, file_bytes_so_far: int, chunk: int) -> None:
        """Count `chunk` more bytes of file `name`, of which `file_bytes_so_far` (this chunk included)."""
        self._check(name, file_bytes_so_far, chunk)
        self.total += chunk
