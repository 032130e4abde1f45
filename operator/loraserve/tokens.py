"""Per-Deployment tokens that lock a model server (vLLM `--api-key`, the adapter fetcher) to the router and
the operator.

One install-wide key (a Secret the chart generates, mounted as a file into the operator and the router) is
the root; each Deployment's token is HMAC-SHA256(key, "<namespace>/<name>"). So the router can present the
token of any Deployment without reading Secrets through the API, and the operator only ever writes the one
Secret per Deployment that the pod reads (create + patch; never get or list). Rotating the install key rotates
every token on the next reconcile. Pure: no I/O but reading the key file once at start.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

TOKEN_KEY = "token"  # the key inside each Deployment's token Secret


def token_secret_name(deployment: str) -> str:
    return f"{deployment}-model-server-token"


@dataclass(frozen=True)
class ModelServerTokens:
    """Derives each Deployment's token; `key` None means model servers run without a token (dev only)."""

    key: bytes | None = None

    @classmethod
    def from_file(cls, path: str | None) -> ModelServerTokens:
        if not path:
            return cls(None)
        key = Path(path).read_bytes().strip()
        if len(key) < 16:
            raise ValueError(f"model-server key file {path}: the key must be at least 16 bytes")
        return cls(key)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def token(self, namespace: str, name: str) -> str | None:
        if self.key is None:
            return None
        return _derive(self.key, namespace, name)

    def authorization(self, namespace: str, name: str) -> dict[str, str]:
        """The request header that a model server of this Deployment accepts (empty without a key)."""
        token = self.token(namespace, name)
        return {} if token is None else {"Authorization": f"Bearer {token}"}

    def header_line(self, namespace: str, name: str) -> bytes:
        """The same header as raw HTTP/1.1 bytes, for the router's hand-built request heads (every request)."""
        return b"" if self.key is None else _header_line(self.key, namespace, name)


@functools.lru_cache(maxsize=4096)
def _derive(key: bytes, namespace: str, name: str) -> str:
    return hmac.new(key, f"{namespace}/{name}".encode(), hashlib.sha256).hexdigest()


@functools.lru_cache(maxsize=4096)  # the router's hot path: no HMAC per request
def _header_line(key: bytes, namespace: str, name: str) -> bytes:
    return b"authorization: Bearer " + _derive(key, namespace, name).encode() + b"\r\n"
