"""An async client for a model-server pod's fetcher (`loraserve-fetch serve`, beside vLLM): fetch an adapter
into the pod's local cache and say where it is; remove one. Its errors carry the fetcher's reason and
message, never a remote server's body."""

from __future__ import annotations

import aiohttp

FETCH_TIMEOUT_S = 1800.0  # a large adapter over a slow link
REMOVE_TIMEOUT_S = 30.0


class FetchFailed(Exception):
    """The fetcher refused or failed: `reason` is its class of failure (status reasons), the message names the
    artifact."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FetcherClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def fetch(self, name: str, uri: str, digest: str | None) -> str:
        """The local path of the artifact, fetched (and checked against `digest`) if not yet there.
        Raises FetchFailed, or aiohttp/timeout errors when the fetcher cannot be reached."""
        async with self.session.post(
            f"{self.base_url}/fetch",
            json={"name": name, "uri": uri, "digest": digest},
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
        ) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            if not isinstance(body, dict) or (resp.status == 200 and not isinstance(body.get("path"), str)):
                # Not our fetcher's answer (a proxy, a crash page): its text never reaches status.
                raise FetchFailed("AdapterFetchFailed", f"the fetcher answered HTTP {resp.status}")
            if resp.status != 200:
                reason, message = body.get("reason"), body.get("message")
                if not isinstance(reason, str) or not isinstance(message, str):
                    reason, message = "AdapterFetchFailed", f"the fetcher answered HTTP {resp.status}"
                raise FetchFailed(reason, message)
            return str(body["path"])

    async def remove(self, name: str) -> None:
        async with self.session.delete(
            f"{self.base_url}/adapters/{name}", timeout=aiohttp.ClientTimeout(total=REMOVE_TIMEOUT_S)
        ):
            pass
