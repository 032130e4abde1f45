"""API keys: parsing the keys file, checking a presented key, per-key scope and concurrency. Pure: no I/O.

The keys file (a Secret mounted as a file) is a YAML list; only SHA-256 digests of the keys are stored:

    - name: team-a                 # shown in logs and metrics instead of the key
      sha256: 9f86d081884c7d65...  # hex SHA-256 of the key
      namespaces: [team-a]         # where it may be used; "*" or absent: every namespace
      deployments: [llama-multi]   # optional: only these (a name, or <namespace>/<name>)
      maxConcurrentRequests: 64    # optional: requests at once (default: the router's --key-concurrency)

Concurrency is counted per key NAME in the ring, not on the key objects: a reload (a rotated key gets a
new digest under the same name) replaces the objects while requests are in flight, and those requests
must give back what they took from the same count the new key checks, or the name leaks a slot per
rotation until it is refused forever.

A presented key is hashed and compared with every entry's digest with `hmac.compare_digest`, always all
of them, so the time taken says nothing about which entry (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class KeysFileError(ValueError):
    """The keys file is malformed; the message names the entry (never a key)."""


@dataclass(slots=True, eq=False)
class ApiKey:
    name: str
    digest: bytes
    namespaces: frozenset[str] | None  # None: every namespace
    deployments: frozenset[str] | None  # None: every deployment in those namespaces
    max_concurrent: int | None = None

    def allows_namespace(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    def allows(self, namespace: str, deployment: str) -> bool:
        if not self.allows_namespace(namespace):
            return False
        if self.deployments is None:
            return True
        return deployment in self.deployments or f"{namespace}/{deployment}" in self.deployments


def hash_key(key: str) -> str:
    """The hex digest to put in the keys file for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _names(value: Any, what: str, entry: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise KeysFileError(f"key {entry!r}: {what} must be a list of names")
    names = frozenset(value)
    return None if "*" in names else names


def parse_keys(text: str) -> list[ApiKey]:
    """Parse the keys file. Raises KeysFileError with the offending entry's name."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeysFileError(f"keys file is not YAML: {exc.__class__.__name__}") from None
    if isinstance(data, Mapping) and "keys" in data:
        data = data["keys"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise KeysFileError("keys file must be a YAML list of {name, sha256, namespaces, deployments}")
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise KeysFileError(f"entry {i}: must be a mapping")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise KeysFileError(f"entry {i}: name is required")
        if name in seen:
            raise KeysFileError(f"key {name!r}: duplicate name")
        seen.add(name)
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest.strip()):
            raise KeysFileError(f"key {name!r}: sha256 must be 64 hex digits (the SHA-256 of the key)")
        limit = entry.get("maxConcurrentRequests", entry.get("max_concurrent_requests"))
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise KeysFileError(f"key {name!r}: maxConcurrentRequests must be a positive integer")
        keys.append(
            ApiKey(
                name=name,
                digest=bytes.fromhex(digest.strip()),
                namespaces=_names(entry.get("namespaces"), "namespaces", name),
                deployments=_names(entry.get("deployments"), "deployments", name),
                max_concurrent=limit,
            )
        )
    return keys


class KeyRing:
    """The keys in force, and the requests in flight per key name (kept across reloads)."""

    def __init__(self, keys: Sequence[ApiKey] = (), default_max_concurrent: int | None = None) -> None:
        self.default_max_concurrent = default_max_concurrent
        self._keys: tuple[ApiKey, ...] = ()
        self._in_flight: dict[str, int] = {}
        self.replace(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def replace(self, keys: Sequence[ApiKey]) -> None:
        self._keys = tuple(keys)

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def acquire(self, key: ApiKey) -> int | None:
        """Count one more request for `key`'s name. Returns the limit instead when it is already reached."""
        count = self._in_flight.get(key.name, 0)
        limit = self.limit_for(key)
        if limit is not None and count >= limit:
            return limit
        self._in_flight[key.name] = count + 1
        return None

    def release(self, name: str) -> None:
        count = self._in_flight.get(name, 0) - 1
        if count > 0:
            self._in_flight[name] = count
        else:
            self._in_flight.pop(name, None)

    def authenticate(self, authorization: bytes | str | None) -> ApiKey | None:
        """The key for an `Authorization: Bearer <key>` value, or None. Constant time over the entries."""
        if authorization is None:
            return None
        raw = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip()).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found

    def limit_for(self, key: ApiKey) -> int | None:
        return key.max_concurrent if key.max_concurrent is not None else self.default_max_concurrent
